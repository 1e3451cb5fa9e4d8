"""What registering and looking up one item costs in the MLflow model registry as a library grows (issue 34).

For each backend and each registry layout: the library's registered models are filled to N versions each
(rows written in bulk into MLflow's own tables, with the tags, aliases and models the layout gives a real
item; a sample is read back through MlflowClient); then one new item is registered untimed (connections,
one-time look-ups) and `--window` new items are registered, timed, the way the pipeline registers a fit (found
by item id first, then a content and a style version, plus the layout's alias); then as many existing items
are looked up the way `unziplora registry get` resolves one. Printed per backend and layout: ms per registered
version at the first and the last N, their ratio, and ms per look-up at the last N: medians over the window
(robust to a shared machine's stalls; the means are printed beside them and kept in --json).

    python -m benchmarks.registry_scale --versions 1000 10000
    python -m benchmarks.registry_scale --versions 200 1000 --backends sqlite --window 20     # a quick check

The committed runs the pages quote are docs/results/registry_scale*.json (`--json` writes that form);
docs/img/registry_scale.png is drawn from registry_scale.json (`python -m benchmarks.figures`).

Layouts: `old` is the layout before issue 34 (one registered model per kind, an alias `item-<id>` per item,
found by its item_id and library_key tags); `new` is pipeline/registry/tracking.py's. `tag` (one model, no alias, found
by its item_id tag) and `shard` (256 models per kind by the item id's first two hex digits, an alias per
item) are candidates measured for the choice, and `keytag` the chosen one written out (a tag whose key names
the item: MLflow's tag table is keyed by tag key first, so the search is one index look-up).

Backends: `sqlite` (a local file, MlflowClient straight on it, as a local library's default store),
`server-postgres` (an `mlflow server` on a PostgreSQL cluster this script initialises and starts: Debian's
`postgresql` package and `psycopg2` are needed), `server-sqlite` (an `mlflow server` on a SQLite file).

Goals (issue 34): register_growth <= 1.5 between 1k and 10k versions; lookup <= 50 ms at 10k.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

try:
    from benchmarks import results as result_files
except ImportError:  # run as a file: benchmarks/ is sys.path[0]
    import results as result_files

LIBRARY = "bench"
OUTPUT = "s3://bench/library"  # the library's URI in the tags (nothing is read there)
KINDS = ("content", "style")
SHARDS = 256  # the `shard` candidate


def item_id(n: int) -> str:
    return hashlib.sha256(f"item-{n}".encode()).hexdigest()[:24]


def fake_row(n: int) -> dict:
    """A manifest row of an ok fit, with what registration reads (nothing behind the URIs is read)."""
    iid = item_id(n)
    out = f"{OUTPUT}/items/{iid}"
    files = {f"{k}_lora.safetensors": {"uri": f"{out}/{k}_lora.safetensors", "sha256": hashlib.sha256(
        f"{iid}{k}".encode()).hexdigest()} for k in KINDS} | {
        f"preview_{k}.png": {"uri": f"{out}/preview_{k}.png", "sha256": "0" * 64} for k in KINDS}
    row = {"item_id": iid, "status": "ok", "output_uri": out, "source_uri": f"s3://bench/in/img{n:07d}.png",
           "files": json.dumps(files), "content": f"thing{n % 97}", "style": f"style{n % 13}",
           "class_word": "thing", "prompt_content": f"A sks thing{n % 97}", "prompt_style": f"in style{n % 13}",
           "prompt_combined": f"A sks thing{n % 97} in style{n % 13}", "base_model": "toy",
           "base_model_fingerprint": "sha256-tree:" + "1" * 16, "rank": 4, "steps": 600}
    return row | {f"score_{s}": 0.5 for s in ("content", "style", "content_style_leak", "style_shape_leak")}


def version_tags(row: dict, kind: str, library_key: str, layout_name: str = "") -> dict:
    """The tags the pipeline gives a version (pipeline/registry/tracking.py, Tracker.register)."""
    files = json.loads(row["files"])
    lora = files[f"{kind}_lora.safetensors"]
    tags = {"kind": kind, "item_id": row["item_id"], "source_uri": row["source_uri"], "content": row["content"],
            "trigger": row["content"], "style": row["style"], "class_word": row["class_word"],
            "prompt": row[f"prompt_{kind}"], "prompt_combined": row["prompt_combined"],
            "lora_file": f"{kind}_lora.safetensors", "lora_uri": lora["uri"], "sha256": lora["sha256"],
            "library_uri": OUTPUT, "library_key": library_key, "base_model": row["base_model"],
            "base_model_fingerprint": row["base_model_fingerprint"], "rank": str(row["rank"]),
            "steps": str(row["steps"]), "preview_uri": files[f"preview_{kind}.png"]["uri"]}
    if layout_name in ("keytag", "new"):
        tags[f"item-{row['item_id'][:16]}"] = row["item_id"]
    return tags | {f"score_{s}": "0.5" for s in ("content", "style", "content_style_leak", "style_shape_leak")}


def literal(value: str) -> str:
    return f"'{value}'"


# ---------------------------------------------------------------------------------------------------------
# Layouts: where an item's versions go, how registration finds and creates them, how a lookup resolves one


class Layout:
    name = ""
    aliases = True

    def __init__(self, client, uri: str):
        self.client, self.key = client, "k" * 16

    def model(self, kind: str, iid: str) -> str:
        return f"{LIBRARY}-{kind}"

    def models(self) -> list[str]:
        return [f"{LIBRARY}-{k}" for k in KINDS]

    def register(self, row: dict, run_id: str) -> None:
        raise NotImplementedError

    def lookup(self, kind: str, iid: str):
        raise NotImplementedError


class Old(Layout):
    """Before issue 34: one model per kind, an alias per item, found by item_id and library_key tags."""
    name = "old"

    def register(self, row, run_id):
        for kind in KINDS:
            name = self.model(kind, row["item_id"])
            found = self.client.search_model_versions(
                f"name = {literal(name)} AND tags.item_id = {literal(row['item_id'])} "
                f"AND tags.library_key = '{self.key}'")
            version = found[0] if found else self.client.create_model_version(
                name, row["output_uri"], run_id=run_id, await_creation_for=0, description="bench",
                tags=version_tags(row, kind, self.key, self.name))
            self.client.set_registered_model_alias(name, f"item-{row['item_id'][:16]}", version.version)

    def lookup(self, kind, iid):
        return self.client.get_model_version_by_alias(self.model(kind, iid), f"item-{iid[:16]}")


class Tag(Layout):
    """One model per kind, no alias: found by its item_id tag alone."""
    name, aliases = "tag", False

    def find(self, name, iid):
        found = self.client.search_model_versions(f"name = {literal(name)} AND tags.item_id = {literal(iid)}")
        return found[0] if found else None

    def register(self, row, run_id):
        for kind in KINDS:
            name = self.model(kind, row["item_id"])
            if self.find(name, row["item_id"]) is None:
                self.client.create_model_version(name, row["output_uri"], run_id=run_id, await_creation_for=0,
                                                 description="bench", tags=version_tags(row, kind, self.key, self.name))

    def lookup(self, kind, iid):
        return self.find(self.model(kind, iid), iid)


class Shard(Layout):
    """256 models per kind by the item id's first two hex digits, an alias per item."""
    name = "shard"

    def model(self, kind, iid):
        return f"{LIBRARY}-{kind}-{iid[:2]}"

    def models(self):
        return [f"{LIBRARY}-{k}-{s:02x}" for k in KINDS for s in range(SHARDS)]

    def register(self, row, run_id):
        for kind in KINDS:
            name, alias = self.model(kind, row["item_id"]), f"item-{row['item_id'][:16]}"
            try:
                version = self.client.get_model_version_by_alias(name, alias)
            except Exception:
                version = self.client.create_model_version(
                    name, row["output_uri"], run_id=run_id, await_creation_for=0, description="bench",
                    tags=version_tags(row, kind, self.key, self.name))
                self.client.set_registered_model_alias(name, alias, version.version)

    def lookup(self, kind, iid):
        return self.client.get_model_version_by_alias(self.model(kind, iid), f"item-{iid[:16]}")


class KeyTag(Tag):
    """One model per kind, no alias: found by a tag whose key names the item (`item-<id>`), which MLflow's
    tag table indexes (its primary key starts with the key)."""
    name = "keytag"

    def find(self, name, iid):
        found = self.client.search_model_versions(
            f"name = {literal(name)} AND tags.`item-{iid[:16]}` = {literal(iid)}")
        return found[0] if found else None


class New(KeyTag):
    """pipeline/registry/tracking.py's own registration (Tracker.register) and `unziplora registry get`'s look-up
    (jobs/registry.py, resolve) of `<library>-<kind>@item-<id>`."""
    name = "new"

    def __init__(self, client, uri):
        from pipeline.registry.tracking import Tracker

        super().__init__(client, uri)
        self.tracker = Tracker(uri, LIBRARY, OUTPUT)
        self.key = self.tracker.library_key

    def register(self, row, run_id):
        self.tracker.register(row, run_id)

    def lookup(self, kind, iid):
        from jobs.registry import resolve
        from pipeline.registry.registry_names import item_handle

        return resolve(self.client, item_handle(LIBRARY, kind, iid))


LAYOUTS = {c.name: c for c in (Old, Tag, Shard, KeyTag, New)}


# ---------------------------------------------------------------------------------------------------------
# Filling a store in bulk: the rows MLflow writes for a version, straight into its tables


def fill(engine, layout: Layout, start: int, stop: int, run_id: str) -> None:
    """Items start..stop-1 as versions of the layout's models, each model's versions numbered on from its
    highest; written in one transaction per 2000 items through MLflow's own table definitions."""
    import sqlalchemy as sa
    from mlflow.store.model_registry.dbmodels.models import (SqlModelVersion, SqlModelVersionTag,
                                                             SqlRegisteredModelAlias)

    with engine.begin() as db:
        top = dict(db.execute(sa.select(SqlModelVersion.name, sa.func.max(SqlModelVersion.version))
                              .group_by(SqlModelVersion.name)).all())
    now = int(time.time() * 1000)
    for chunk in range(start, stop, 2000):
        versions, tags, aliases = [], [], []
        for n in range(chunk, min(stop, chunk + 2000)):
            row = fake_row(n)
            for kind in KINDS:
                name = layout.model(kind, row["item_id"])
                top[name] = version = (top.get(name) or 0) + 1
                versions.append(dict(workspace="default", name=name, version=version, creation_time=now,
                                     last_updated_time=now, description="bench", user_id=None,
                                     current_stage="None", source=row["output_uri"],
                                     storage_location=row["output_uri"], run_id=run_id, run_link=None,
                                     status="READY", status_message=None))
                tags += [dict(workspace="default", name=name, version=version, key=k, value=v)
                         for k, v in version_tags(row, kind, layout.key, layout.name).items()]
                if layout.aliases:
                    aliases.append(dict(workspace="default", name=name, version=version,
                                        alias=f"item-{row['item_id'][:16]}"))
        with engine.begin() as db:
            db.execute(SqlModelVersion.__table__.insert(), versions)
            db.execute(SqlModelVersionTag.__table__.insert(), tags)
            if aliases:
                db.execute(SqlRegisteredModelAlias.__table__.insert(), aliases)


# ---------------------------------------------------------------------------------------------------------
# Backends


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres():
    """A PostgreSQL cluster of Debian's `postgresql` package in a temporary folder, on a free port; yields its
    SQLAlchemy URL, removes it all at the end. As root, the cluster runs as the `postgres` user."""
    bindir = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
    if bindir is None or not (bindir / "initdb").exists():
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="unziplora-pg-"))
    folder.chmod(0o755)  # the postgres user reaches its data folder in there
    data, port = folder / "data", free_port()
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data.mkdir()
    if run_as:
        shutil.chown(data, "postgres")
        shutil.chown(folder, "postgres")
    pg_ctl = run_as + [str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                 "-E", "UTF8"], check=True, capture_output=True)
        subprocess.run(pg_ctl + ["-l", str(folder / "server.log"), "-w", "-o",
                                 f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True)
        try:
            subprocess.run(run_as + [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                                     "postgres", "mlflow"], check=True, capture_output=True)
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
        finally:
            subprocess.run(pg_ctl + ["-m", "fast", "-w", "stop"], capture_output=True)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"PostgreSQL: {exc.cmd[-1]} failed: {(exc.stderr or b'').decode()[-1500:]}") from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(db_uri: str, folder: Path):
    """`mlflow server` on `db_uri`, one worker, artifacts in `folder`; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                                    str(port), "--workers", "1", "--backend-store-uri", db_uri,
                                    "--artifacts-destination", (folder / "artifacts").as_uri()],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError("mlflow server ended: " + (folder / "server.log").read_text()[-2000:])
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            if time.time() > deadline:
                raise TimeoutError("mlflow server did not start")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


@contextlib.contextmanager
def backend(kind: str, folder: Path):
    """Yields (client URI, database URI) of a fresh store."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "sqlite":
        uri = f"sqlite:///{folder}/mlflow.db"
        yield uri, uri
    elif kind == "server-sqlite":
        db = f"sqlite:///{folder}/mlflow.db"
        with mlflow_server(db, folder) as url:
            yield url, db
    elif kind == "server-postgres":
        with postgres() as db, mlflow_server(db, folder) as url:
            yield url, db
    else:
        raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------------
# One measurement


def measure(backend_kind: str, layout_name: str, sizes: list[int], window: int, folder: Path,
            warmup_s: float = 0.0) -> dict:
    import sqlalchemy as sa
    from mlflow import MlflowClient

    out = {"backend": backend_kind, "layout": layout_name, "register_ms": {}, "register_mean_ms": {},
           "lookup_ms": {}, "lookup_mean_ms": {}}
    with backend(backend_kind, folder) as (uri, db_uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        layout = LAYOUTS[layout_name](client, uri)
        experiment = client.get_experiment_by_name(LIBRARY) or client.get_experiment(
            client.create_experiment(LIBRARY))
        run_id = client.create_run(experiment.experiment_id).info.run_id
        for name in layout.models():
            client.create_registered_model(name)
        engine = sa.create_engine(db_uri)
        rng = random.Random(0)
        done, fresh = 0, 10 ** 8  # filler items from 0 on; registered ones (warm-up, windows) from 10^8 on
        # a fresh `mlflow server` answers slowly for its first half-minute or so (measured: ~190 ms a version at
        # 1k, then ~46 ms at 1.1k, 1.2k and 10k): untimed registrations first, until `warmup_s` has passed
        deadline = time.perf_counter() + warmup_s
        while time.perf_counter() < deadline:
            layout.register(fake_row(fresh), run_id)
            fresh += 1
        out["warmup_items"] = fresh - 10 ** 8

        def existing() -> str:  # an item already there: a filler one or one registered through the layout
            n = rng.randrange(done + fresh - 10 ** 8)
            return item_id(n if n < done else 10 ** 8 + n - done)

        for size in sizes:  # filler up to N versions in all, the items registered through the layout counted
            target = max(done, size - (fresh - 10 ** 8))
            fill(engine, layout, done, target, run_id)
            done = target
            if done:  # the filler reads back through MLflow
                assert layout.lookup("style", item_id(done - 1)).tags["item_id"] == item_id(done - 1)
            layout.register(fake_row(fresh), run_id)  # untimed: connections, the tracker's one-time look-ups
            times = []
            for n in range(fresh + 1, fresh + 1 + window):
                start = time.perf_counter()
                layout.register(fake_row(n), run_id)
                times.append((time.perf_counter() - start) * 1000 / len(KINDS))
            fresh += window + 1
            out["register_ms"][size], out["register_mean_ms"][size] = statistics.median(times), statistics.mean(times)
            times = []
            for iid in [existing() for _ in range(window)]:
                kind = rng.choice(KINDS)
                start = time.perf_counter()
                version = layout.lookup(kind, iid)
                times.append((time.perf_counter() - start) * 1000)
                assert version.tags["item_id"] == iid
            out["lookup_ms"][size], out["lookup_mean_ms"][size] = statistics.median(times), statistics.mean(times)
            print(f"  {backend_kind} {layout_name} N={size}: register {out['register_ms'][size]:.1f} ms/version "
                  f"(mean {out['register_mean_ms'][size]:.1f}), lookup {out['lookup_ms'][size]:.1f} ms "
                  f"(mean {out['lookup_mean_ms'][size]:.1f})", flush=True)
        engine.dispose()
    return out


def label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "server-postgres"],
                        choices=["sqlite", "server-postgres", "server-sqlite"])
    parser.add_argument("--layouts", nargs="+", default=["old", "new"], choices=sorted(LAYOUTS))
    parser.add_argument("--window", type=int, default=50, help="items registered and looked up at each N")
    parser.add_argument("--warmup-s", type=float, default=30.0,
                        help="untimed registrations against a fresh server for this long first (default 30 s)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--plot", help="also draw ms per version against N into this PNG")
    args = parser.parse_args(argv)
    sizes = sorted(set(args.versions))
    results = []
    with tempfile.TemporaryDirectory(prefix="registry-scale-") as tmp:
        for b in args.backends:
            for layout in args.layouts:
                warmup = args.warmup_s if b.startswith("server") else 0.0
                results.append(measure(b, layout, sizes, args.window, Path(tmp, f"{b}-{layout}"), warmup))
    first, last = sizes[0], sizes[-1]
    for r in results:
        a, z = r["register_ms"][first], r["register_ms"][last]
        r["register_growth"] = z / a
        print(f"\n[{r['backend']}, {r['layout']} layout]")
        print(f"register_ms_at_{label(first)} = {a:.1f}")
        print(f"register_ms_at_{label(last)} = {z:.1f}")
        print(f"register_growth = {z / a:.2f}")
        print(f"lookup_ms_at_{label(last)} = {r['lookup_ms'][last]:.1f}")
    if args.json:
        result_files.save(args.json, results)
    if args.plot:
        plot(results, args.plot)
    return 0


def plot(results: list[dict], path: str) -> None:
    """ms per registered version and per look-up against the versions already there, one line per backend
    and layout (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for r in results:
        style = "-" if r["layout"] == "new" else "--"
        for ax, key in zip(axes, ("register_ms", "lookup_ms")):
            sizes = sorted(r[key], key=int)  # a --json file's keys are text
            ax.plot([int(n) for n in sizes], [r[key][n] for n in sizes], style, marker="o",
                    label=f"{r['backend']}, {r['layout']}")
    for ax, title in zip(axes, ("register: ms per version", "look-up: ms per item")):
        ax.set(xscale="log", yscale="log", xlabel="versions already in each model", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
