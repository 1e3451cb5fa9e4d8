"""MLflow tracking and model registry of a LoRA library.

One parent run per job, one nested run per fit (params, per-step metrics, final metrics, fit.json and previews
as artifacts), and each ok fit's LoRAs registered as versions of `<library>-content` / `<library>-style`
(names in registry_names), each marked by its item tag `item-<id>` (no alias per item: see registry_names).
A version's source is the item's folder in the library itself, so no LoRA is copied; only where the registry
could not read the library (a local library, a remote server) or when asked (`log_lora_artifacts`), the LoRA
files are logged to the run and the version points there.

Tracking never decides a fit's fate: callers track after the fit's files and marker are safe and turn any
exception into the row's `tracking_error`; `unziplora registry sync` retries later. Every step is
idempotent (a fit's run is found by its item-id tag, a version by its item tag), so a retry, a second
sync or a sync after a partial failure creates nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from pathlib import Path

from unziplora import fit_files
from unziplora.errors import InputError, UnZipLoRAError
from unziplora.redact import redact, scrub

from .figures import job_figure, loss_figure, png
from .registry_names import ITEM_KEY, KINDS, item_filter, item_key, library_name, model_name
from ..quality.scoring import SCORES
from ..store.storage import Store, library_store, open_url

TAG = "unziplora."  # prefix of our run tags
REGISTRY_FILE = "registry.json"
METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch
SETUP_ATTEMPTS = 3  # tries to open a job's tracking (1 s, 2 s apart) before its fits go untracked


# ---------------------------------------------------------------------------------------------------------
# Where tracking goes, and what may be written there


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def default_tracking_uri(output: str) -> str | None:
    """$MLFLOW_TRACKING_URI; else SQLite next to a local library; else none (SQLite needs a local disk)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if is_local(output):
        return "sqlite:///" + str(Path(output.removeprefix("file://")).resolve() / "mlflow.db")
    return None


def library_key(canonical_uri: str) -> str:
    """The tag that scopes a library's runs and versions in filters: a hash of its one canonical URI, so
    that no free text (quotes, spellings of one path) ever goes into a filter expression."""
    return hashlib.sha256(canonical_uri.encode()).hexdigest()[:16]


def literal(value: str) -> str:
    """`value` as a string literal of an MLflow filter expression. MLflow has no escape inside a quoted
    string, so a value holding both quote characters cannot be matched: a clear error, never a broken query."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise InputError(f"{value[:80]!r} holds both ' and \", which an MLflow filter cannot quote")


def flat_params(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings -> MLflow params (strings; lists as JSON)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= flat_params(value, f"{prefix}{key}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[prefix + key] = text[:6000]  # MLflow's param length limit
    return out


def _bound_http_retries() -> None:
    # MLflow retries a failed request 7 times with backoff (minutes): a fit should not wait that long for a
    # server that is down, since `registry sync` catches up later. The user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def retrying(call, attempts: int = 6):
    """Run `call()`, retrying when SQLite is locked by another worker (several processes share one file).
    Only safe because everything here is idempotent."""
    for n in range(attempts):
        try:
            return call()
        except Exception as exc:
            if n == attempts - 1 or not re.search(r"database is locked|database table is locked|busy", str(exc)):
                raise
            time.sleep(0.2 * 2 ** n * (1 + random.random()))


class TrackingStoreGoneError(UnZipLoRAError):
    """The job's SQLite tracking store was deleted or moved while the job ran."""


def sqlite_file(uri: str) -> str | None:
    """The database file of a sqlite:// tracking URI (None for other stores and in-memory databases)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return None if database in (None, "", ":memory:") else os.path.abspath(database)


# ---------------------------------------------------------------------------------------------------------
# The tracker


class Tracker:
    """An MLflow client bound to one library: its experiment, its registered models, its runs."""

    def __init__(self, uri: str, library: str, output: str, storage_options: dict | None = None,
                 experiment_id: str | None = None, log_lora_artifacts: bool = False,
                 diffusers_models: bool = False, create_store: bool = False):
        _bound_http_retries()
        # every error of the store reaches the caller, which records it (a row's tracking_error, the report):
        # MLflow's own log of it is a SQLAlchemy traceback per fit, and its retries of a store that is gone take
        # minutes
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        # an `mlflow server` client prints two "View run" lines per run it ends, to stdout: the job's stdout is
        # its JSON report, and its output names the UI once
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow import MlflowClient

        self.uri, self.library = uri, library
        self.output = library_store(output, storage_options).url()  # one spelling of the library
        # a SQLite store is created when a job starts (or a sync runs), never later: a worker would make a new
        # empty one where the job's was deleted, and track its fits into runs nobody finds
        self.store_file = sqlite_file(uri)
        if not create_store:
            self.check_store()
        self.library_key = library_key(self.output)
        self.storage_options = storage_options or {}
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        # a server cannot open files on this machine: then the LoRAs go to the run's artifacts
        self.copy_loras = log_lora_artifacts or (is_local(output) and uri.startswith(("http:", "https:")))
        self.diffusers_models = diffusers_models  # also mlflow.diffusers-flavour models (`*-diffusers`)
        self.experiment_id = experiment_id or retrying(self._experiment)
        self._aliased: list[str] | None = None  # models still holding per-item aliases (the old layout)

    def check_store(self) -> None:
        """Raise one line if the SQLite file this tracker writes was deleted or moved."""
        if self.store_file and not os.path.exists(self.store_file):
            raise TrackingStoreGoneError(
                f"the MLflow store {redact(self.uri)} is gone (deleted or moved while the job ran): not tracked; "
                f"the fits are safe in the library, and `unziplora registry sync {redact(self.output)}` tracks "
                f"them into a store again")

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.library)
        if found is not None:
            return found.experiment_id
        # with a local store, artifacts live next to the library (else MLflow picks ./mlruns of the cwd)
        location = None
        if not self.uri.startswith(("http:", "https:", "databricks")) and is_local(self.output):
            location = (Path(self.output.removeprefix("file://")).resolve() / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(self.library, artifact_location=location,
                                                 tags={TAG + "library": redact(self.output)})
        except Exception:  # created meanwhile by another process
            return self.client.get_experiment_by_name(self.library).experiment_id

    def ensure_registered_models(self) -> None:
        flavours = (None, "diffusers") if self.diffusers_models else (None,)
        for kind, flavour in ((k, f) for k in KINDS for f in flavours):
            name = model_name(self.library, kind, flavour)
            if not self.client.search_registered_models(f"name = {literal(name)}"):
                try:
                    self.client.create_registered_model(name, description=f"{kind} LoRAs of the library "
                                                        f"{redact(self.output)}; one version per image")
                except Exception:  # created meanwhile by another process
                    pass

    def model_names(self) -> list[str]:
        """The library's registered models: per kind, the folder versions and the mlflow.diffusers ones."""
        return [model_name(self.library, k, f) for k in KINDS for f in (None, "diffusers")]

    def aliased_models(self) -> list[str]:
        """The library's models that still hold per-item aliases `item-<id>` (registered before issue 34, not
        yet moved by `registry sync`); looked up once per tracker."""
        if self._aliased is None:  # assigned whole: threads tracking at once see none or all of it
            self._aliased = [name for name in self.model_names()
                             for model in self.client.search_registered_models(f"name = {literal(name)}")
                             if any(ITEM_KEY.fullmatch(alias) for alias in model.aliases)]
        return self._aliased

    def registry_record(self) -> dict:
        """What `<output>/registry.json` holds: where a library's runs and LoRAs are registered."""
        layout = 1 if self.aliased_models() else 2  # 1: an alias per item (before issue 34)
        return {"format": f"unziplora-registry/{layout}", "tracking_uri": redact(self.uri),
                "library": self.library, "experiment": self.library, "experiment_id": self.experiment_id,
                "models": {k: model_name(self.library, k) for k in KINDS},
                "item_tag": "item-<first 16 hex digits of the item id> = <item id>",
                "uri": "models:/<model>/<version>; `unziplora registry get <model>@item-<id>` finds the version"}

    # -- runs ----------------------------------------------------------------------------------------------

    def _find_run(self, tag: str, value: str):
        """This library's run with this tag value (another library of the same name may share the experiment).
        Runs are scoped by the library's key; runs logged before keys existed, by the library's URI."""
        query = f"tags.`{TAG}{tag}` = {literal(value)}"
        runs = self.client.search_runs([self.experiment_id], f"{query} AND tags.`{TAG}library_key` = "
                                       f"'{self.library_key}'", max_results=5)
        if not runs and (legacy := self._legacy_scope(f"tags.`{TAG}library_uri`")):
            runs = self.client.search_runs([self.experiment_id], f"{query} AND {legacy}", max_results=5)
            for run in runs:
                self.client.set_tag(run.info.run_id, TAG + "library_key", self.library_key)
        return runs[0] if runs else None

    def _find_version(self, name: str, item_id: str):
        """This library's version of the model `name` for this item: by its item tag (one indexed look-up, the
        library's key checked on the few results). Only while a model still holds the old layout's aliases
        (a library not yet moved by `registry sync`), a version without the tag is searched the old way,
        scoped like `_find_run`, and gets the tag."""
        for version in self.client.search_model_versions(item_filter(name, item_key(item_id))):
            if version.tags.get("item_id") == item_id and self._ours(name, version):
                return version
        if name not in self.aliased_models():
            return None
        query = f"name = {literal(name)} AND tags.item_id = {literal(item_id)}"
        found = self.client.search_model_versions(f"{query} AND tags.library_key = '{self.library_key}'")
        if not found and (legacy := self._legacy_scope("tags.library_uri")):
            found = self.client.search_model_versions(f"{query} AND {legacy}")
            for version in found:
                self.client.set_model_version_tag(name, version.version, "library_key", self.library_key)
        if found:
            self.client.set_model_version_tag(name, found[0].version, item_key(item_id), item_id)
        return found[0] if found else None

    def _ours(self, name: str, version) -> bool:
        """Whether a version belongs to this library (two libraries of one name share the models): by its
        library key, else (registered before keys existed) by its library URI, which then gets the key."""
        key = version.tags.get("library_key")
        if key is None and version.tags.get("library_uri") == redact(self.output):
            self.client.set_model_version_tag(name, version.version, "library_key", self.library_key)
            return True
        return key == self.library_key

    def migrate_registry(self) -> dict:
        """Move the library's versions from the old layout (an alias `item-<id>` per item, which MLflow loads
        in full on every create or read of a version) to item tags: each of this library's versions gets its item
        tag, then loses its `item-` alias (other aliases stay). A version loses its alias only once tagged, so a
        move cut short is safe (the model still holds aliases: versions without the tag are still found the old
        way) and the next sync goes on. One paged listing per model, one call per tag and alias."""
        out = {"tagged": 0, "aliases_removed": 0}
        for name in self.aliased_models() or []:
            [model] = self.client.search_registered_models(f"name = {literal(name)}")
            aliases = {alias: str(version) for alias, version in model.aliases.items() if ITEM_KEY.fullmatch(alias)}
            token = None
            while True:
                page = self.client.search_model_versions(f"name = {literal(name)}", max_results=1000,
                                                         order_by=["version_number ASC"], page_token=token)
                for version in page:
                    item_id = version.tags.get("item_id")
                    if not item_id or not self._ours(name, version):
                        continue
                    key = item_key(item_id)
                    if key not in version.tags:
                        self.client.set_model_version_tag(name, version.version, key, item_id)
                        out["tagged"] += 1
                    if aliases.get(key) == str(version.version):  # each alias gone makes the next calls cheaper
                        self.client.delete_registered_model_alias(name, key)
                        out["aliases_removed"] += 1
                token = page.token
                if not token:
                    break
        self._aliased = None
        return out

    def _legacy_scope(self, tag: str) -> str | None:
        try:
            return f"{tag} = {literal(redact(self.output))}"
        except InputError:  # a URI no filter can quote was never matched by one either
            return None

    def close_dead_jobs(self, live_run_id: str, store: Store | None = None) -> list[str]:
        """Close the parent runs of this library's jobs still RUNNING: the caller holds the library's lease, so
        their jobs are over. A job that stored its report ended while MLflow was away (a server that came back):
        its run gets the report's metrics and FINISHED; any other died (a killed driver, a lost head node) and
        is KILLED."""
        query = (f"tags.`{TAG}kind` = 'job' AND tags.`{TAG}library_key` = '{self.library_key}' "
                 f"AND attributes.status = 'RUNNING'")
        closed = []
        for run in self.client.search_runs([self.experiment_id], query, max_results=1000):
            job_run_id = run.data.tags.get(TAG + "job_run_id")
            if job_run_id == live_run_id:
                continue
            self.client.set_tag(run.info.run_id, TAG + "closed_by", live_run_id)
            report = _stored_report(store, job_run_id)
            if report:
                self.end_job(run.info.run_id, report)
            else:
                self.client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
        return closed

    def abort_job(self, parent_run_id: str, status: str, reason: str) -> None:
        self.check_store()
        self.client.set_tag(parent_run_id, TAG + "error", reason[:4000])
        self.client.set_terminated(parent_run_id, status)

    def job_run(self, run_id: str, params: dict | None = None) -> str:
        """The parent run of the job `run_id`: found by its tag, else created (RUNNING until end_job)."""
        found = self._find_run("job_run_id", run_id)
        if found is not None:
            return found.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"job-{run_id}",
                                     tags={TAG + "kind": "job", TAG + "job_run_id": run_id,
                                           TAG + "library_uri": redact(self.output),
                                           TAG + "library_key": self.library_key})
        if params:
            self.client.log_batch(run.info.run_id, params=_params(flat_params(params)))
        return run.info.run_id

    def end_job(self, parent_run_id: str, report: dict, rows: list[dict] | None = None) -> None:
        from mlflow.entities import Metric

        self.check_store()
        now = int(time.time() * 1000)
        numbers = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.client.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in numbers.items()])
        if rows:
            self._log_figure(parent_run_id, lambda: job_figure(rows, report["run_id"]), "job_summary.png")
        self.client.set_terminated(parent_run_id, "FINISHED")

    def _log_figure(self, run_id: str, draw, name: str) -> None:
        """A figure beside the run's metrics; one that cannot be drawn is left out."""
        try:
            image = png(draw)
        except Exception:
            return
        with tempfile.TemporaryDirectory(prefix="unziplora-figure-") as tmp:
            Path(tmp, name).write_bytes(image)
            self.client.log_artifact(run_id, str(Path(tmp, name)))

    def track_fit(self, row: dict, parent_run_id: str | None) -> dict:
        """One fit's nested run (and for an ok row its registered versions); returns the row's new columns.
        Idempotent: a run already complete for this item is reused, an incomplete one replaced."""
        self.check_store()
        return retrying(lambda: self._track_fit(row, parent_run_id))

    def _track_fit(self, row: dict, parent_run_id: str | None) -> dict:
        found = self._find_run("item_id", row["item_id"])
        if found is not None and found.data.tags.get(TAG + "tracked") == row["status"]:
            run_id = found.info.run_id
        else:
            if found is not None:  # a previous attempt stopped half-way: start over
                self.client.delete_run(found.info.run_id)
            run_id = self._log_fit_run(row, parent_run_id)
        out = {"mlflow_run_id": run_id, "tracking_error": None}
        if row["status"] == "ok":
            out |= self.register(row, run_id)
        return out

    def _log_fit_run(self, row: dict, parent_run_id: str | None) -> str:
        from mlflow.entities import Metric, RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        files = json.loads(row.get("files") or "{}")
        record = self._read_json(files, fit_files.RECORD) or {}
        tags = {"kind": "fit", "item_id": row["item_id"], "status": row["status"], "worker": row.get("worker"),
                "job_run_id": row.get("run_id"), "error": scrub(row.get("error") or "")[:4000],
                "library_uri": redact(self.output), "library_key": self.library_key}
        tags |= {k: redact(row.get(k)) for k in ("source_uri", "output_uri", "content_lora_uri", "style_lora_uri")}
        if row.get("gate_passed") is not None:  # went through the quality gate (pipeline/quality/gate.py)
            tags |= {"gate_passed": str(row["gate_passed"]).lower(), "candidates": str(row["candidates"])}
        tags = {TAG + k: v for k, v in tags.items() if v}
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=f"fit-{row['item_id'][:12]}", tags=tags)
        run_id = run.info.run_id
        params = flat_params(record.get("settings") or {"content": row.get("content"), "style": row.get("style")})
        params |= flat_params(record.get("prompts") or {}, "prompt.")
        params |= {"base_model": str(record.get("base_model") or row.get("base_model")),
                   "base_model_fingerprint": str(row.get("base_model_fingerprint")),
                   "code_version": str(row.get("code_version"))}
        history = self._read_json(files, fit_files.HISTORY) or []
        metrics = step_metrics(history, run.info.start_time)
        metrics += [Metric(k, float(v), run.info.start_time, 0) for k, v in final_metrics(row, record).items()]
        self.client.log_batch(run_id, params=_params(params))
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + METRICS_PER_BATCH])
        if history:
            self._log_figure(run_id, lambda: loss_figure(history), "loss_curves.png")
        with tempfile.TemporaryDirectory(prefix="unziplora-track-") as tmp:
            for name in (fit_files.RECORD, fit_files.CONFIG, *fit_files.PREVIEWS.values(), fit_files.PREVIEW_PROMPTS,
                         fit_files.SCORES):
                if name in files:
                    Path(tmp, name).write_bytes(open_url(files[name]["uri"], self.storage_options))
            if os.listdir(tmp):
                self.client.log_artifacts(run_id, tmp)
            if self.copy_loras and row["status"] == "ok":
                for kind in KINDS:
                    folder = Path(tmp, f"{kind}_lora")
                    folder.mkdir()
                    # the LoRA's file, and its other formats' where the fit has them (older fits: a kohya copy)
                    for name in sorted(n for n in files if n.startswith(f"{kind}_lora") and n.endswith(".safetensors")):
                        (folder / name).write_bytes(open_url(files[name]["uri"], self.storage_options))
                    self.client.log_artifacts(run_id, str(folder), f"{kind}_lora")
        self.client.set_terminated(run_id, "FINISHED" if row["status"] == "ok" else "FAILED")
        self.client.log_batch(run_id, tags=[RunTag(TAG + "tracked", row["status"])])  # last: the run is complete
        return run_id

    def _read_json(self, files: dict, name: str):
        return json.loads(open_url(files[name]["uri"], self.storage_options)) if name in files else None

    # -- registry ------------------------------------------------------------------------------------------

    def register(self, row: dict, run_id: str) -> dict:
        """The row's content and style LoRAs as model versions (found by the item tag, else created), each
        tagged `item-<id>` = item id; returns `{kind}_model_uri` columns (version-pinned URIs)."""
        files = json.loads(row["files"])
        out = {}
        for kind in KINDS:
            name = model_name(self.library, kind)
            version = self._find_version(name, row["item_id"])
            if version is None:
                source = row["output_uri"]
                if self.copy_loras:
                    source = self.client.get_run(run_id).info.artifact_uri + f"/{kind}_lora"
                lora = files[f"{kind}_lora.safetensors"]
                tags = {"kind": kind, "item_id": row["item_id"], item_key(row["item_id"]): row["item_id"],
                        "source_uri": redact(row["source_uri"]),
                        "content": row["content"], "trigger": row["content"], "style": row["style"],
                        "class_word": row["class_word"], "prompt": row[f"prompt_{kind}"],
                        "prompt_combined": row["prompt_combined"], "lora_file": f"{kind}_lora.safetensors",
                        "lora_uri": redact(lora["uri"]), "sha256": lora["sha256"], "library_uri": redact(self.output),
                        "library_key": self.library_key, "base_model": row["base_model"], "base_model_fingerprint": row.get("base_model_fingerprint"),
                        "rank": str(row["rank"]), "steps": str(row["steps"])}
                tags |= {f"score_{name}": row.get(f"score_{name}") for name in SCORES}  # None: not scored
                tags |= {"gate_passed": None if row.get("gate_passed") is None else str(row["gate_passed"]).lower(),
                         "split_score": row.get("split_score")}
                if fit_files.PREVIEWS[kind] in files:
                    tags["preview_uri"] = redact(files[fit_files.PREVIEWS[kind]]["uri"])
                description = (f"{kind} LoRA ({tags['lora_file']}) of {tags['source_uri']}: content "
                               f"'{row['content']}', style '{row['style']}'")
                version = self.client.create_model_version(
                    name, source, run_id=run_id, description=description, await_creation_for=0,
                    tags={k: str(v) for k, v in tags.items() if v is not None})
            out[f"{kind}_model_uri"] = f"models:/{name}/{version.version}"
            if self.diffusers_models and diffusers_base(row):
                out[f"{kind}_diffusers_model_uri"] = self._register_diffusers(row, run_id, kind, version.tags)
        return out

    def _register_diffusers(self, row: dict, run_id: str, kind: str, tags: dict) -> str:
        """The LoRA as an `mlflow.diffusers` model (MLmodel, adapter weights, requirements; pyfunc-loadable:
        base pipeline + LoRA) logged to the fit's run and registered as `<library>-<kind>-diffusers`, with the
        base model pinned to the commit the fit used. Found by item id before anything is created."""
        import mlflow.diffusers
        from mlflow.models import Model

        name = model_name(self.library, kind, "diffusers")
        version = self._find_version(name, row["item_id"])
        if version is None:
            base, revision = diffusers_base(row)
            artifact = f"{kind}_diffusers_model"
            with tempfile.TemporaryDirectory(prefix="unziplora-model-") as tmp:
                adapter = Path(tmp, f"{kind}_lora.safetensors")
                adapter.write_bytes(open_url(json.loads(row["files"])[adapter.name]["uri"], self.storage_options))
                mlflow.diffusers.save_model(adapter_path=str(adapter), path=f"{tmp}/{artifact}", base_model=base,
                                            metadata={"unziplora_item_id": row["item_id"], "kind": kind})
                model = Model.load(f"{tmp}/{artifact}")
                if revision:  # the fit's own commit, not the Hub's latest, which save_model would look up
                    model.flavors["diffusers"]["base_model_revision"] = revision
                model.save(f"{tmp}/{artifact}/MLmodel")
                self.client.log_artifacts(run_id, f"{tmp}/{artifact}", artifact)
            source = self.client.get_run(run_id).info.artifact_uri + f"/{artifact}"
            version = self.client.create_model_version(
                name, source, run_id=run_id, await_creation_for=0,
                tags=dict(tags) | {item_key(row["item_id"]): row["item_id"]},
                description=f"{kind} LoRA of {tags.get('source_uri')} as an mlflow.diffusers model on {base}")
        return f"models:/{name}/{version.version}"


def diffusers_base(row: dict) -> tuple[str, str | None] | None:
    """What an mlflow.diffusers model can name as its base: a hub id (and its commit) or a local folder; not a
    preset, a packaged model or a single file, which diffusers' from_pretrained cannot load by name."""
    fingerprint = row.get("base_model_fingerprint") or ""
    if fingerprint.startswith("hub:"):
        repo, _, commit = fingerprint[4:].rpartition("@")
        return repo, commit
    if fingerprint.startswith("sha256-tree:") and Path(row["base_model"]).is_absolute():
        return row["base_model"], None
    return None


def _params(values: dict[str, str]) -> list:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in values.items()]


def step_metrics(history: list[dict], start_ms: int) -> list:
    """Per-step loss, mse, orthogonality loss; mask fractions per role at each recalibration step."""
    from mlflow.entities import Metric

    out = []
    for step, h in enumerate(history):
        stamp = start_ms + step  # distinct, ordered timestamps
        out += [Metric(k, float(h[k]), stamp, step) for k in ("loss", "mse", "ortho") if k in h]
        for role, stats in (h.get("mask_stats") or {}).items():
            out += [Metric(f"mask.{role}.{k}", float(stats[k]), stamp, step) for k in ("content", "style", "overlap")]
    return out


def final_metrics(row: dict, record: dict) -> dict[str, float]:
    final = record.get("final") or {}
    timings = record.get("timings") or {}
    out = {f"final_{k}": v for k, v in final.items()}
    out |= {k: v for k, v in timings.items() if isinstance(v, (int, float))}
    for role, stats in (record.get("mask_stats") or {}).items():
        out |= {f"final_mask.{role}.{k}": stats[k] for k in ("content", "style", "overlap")}
    out["attempts"] = row.get("attempts") or 0
    out |= {f"score.{name}": row.get(f"score_{name}") for name in SCORES}  # pipeline/quality/scoring.py
    gate = record.get("gate") or {}  # pipeline/quality/gate.py: the kept candidate's split score, and every candidate's
    out["split_score"] = gate.get("split_score")
    for candidate in gate.get("candidates", []):
        prefix = f"candidate.seed_{candidate['seed']}"
        out[f"{prefix}.split_score"] = candidate.get("split_score")
        out[f"{prefix}.early_split_score"] = candidate.get("early_split_score")  # --select-after's look mid-training
        out |= {f"{prefix}.{name}": value for name, value in (candidate.get("scores") or {}).items()}
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------
# A job's tracking: start (driver), per fit (workers), end (driver)


def tracker_for(job, experiment_id: str | None = None, create_store: bool = False) -> Tracker:
    return Tracker(job.tracking.uri, job.tracking.library or library_name(job.output), job.output, job.storage_options,
                   experiment_id=experiment_id, log_lora_artifacts=job.tracking.log_lora_artifacts,
                   diffusers_models=job.tracking.log_diffusers_models, create_store=create_store)


def job_params(job) -> dict:
    """The job's settings as params: no storage options (credentials), URLs without secrets."""
    return {"input": redact(job.input), "output": redact(job.output), "prompts": redact(job.prompts),
            "executor": job.scaling.executor, "workers": job.scaling.workers, "max_attempts": job.failure.max_attempts,
            "library": job.tracking.library or library_name(job.output), "preview_steps": job.previews.steps,
            "fit": job.fit, "base_model_fingerprint": job.state.base_fingerprint,
            "code_version": job.state.code_version}


def _stored_report(store: Store | None, job_run_id: str | None) -> dict | None:
    """The report a job stored when it ended (reports/<run>.json), if any."""
    try:
        return store.read_json("reports", f"{job_run_id}.json") if store and job_run_id else None
    except (OSError, ValueError):  # none (the job died), or unreadable
        return None


def start_job(job, store: Store, progress: bool = True, parent: bool = True):
    """Resolve the tracking URI, open the job's parent run, write registry.json; returns the job with
    `tracking.uri`, `state.mlflow_experiment_id`, `state.mlflow_parent_run_id` set (or `state.tracking_error`
    when it failed). Without `parent` (a job with nothing to fit) no run is opened: the runs of jobs that died
    are closed."""
    if not job.tracking.enabled:
        return job
    uri = job.tracking.uri or default_tracking_uri(job.output)
    if uri is None:
        if progress:
            print("tracking off: no MLflow tracking URI for a remote --output (give --tracking-uri or "
                  "$MLFLOW_TRACKING_URI)", flush=True)
        return job.replace(tracking={"enabled": False})
    job = job.replace(tracking={"uri": uri, "library": job.tracking.library or recorded_library(store)
                                or library_name(job.output)})
    if not parent:
        if sqlite_file(uri) and not os.path.exists(sqlite_file(uri)):
            return job  # no store yet (the library was never tracked): no run to close, none made
        try:
            tracker = tracker_for(job)
            closed = retrying(lambda: tracker.close_dead_jobs(job.state.run_id, store))
        except Exception as exc:  # nothing of this job to track: the next job closes them
            return job.replace(state={"tracking_error": describe(exc)})
        _say_closed(closed, progress)
        return job.replace(state={"mlflow_experiment_id": tracker.experiment_id})
    for attempt in range(SETUP_ATTEMPTS):  # a hiccup at job start must not leave the whole job untracked
        try:
            tracker = tracker_for(job, create_store=True)
            retrying(tracker.ensure_registered_models)
            run = retrying(lambda: tracker.job_run(job.state.run_id, job_params(job)))
            closed = retrying(lambda: tracker.close_dead_jobs(job.state.run_id, store))
            aliased = retrying(tracker.aliased_models)
            store.write_json(tracker.registry_record(), REGISTRY_FILE)
            break
        except Exception as exc:
            if attempt < SETUP_ATTEMPTS - 1:
                time.sleep(2 ** attempt)
                continue
            if progress:
                print(f"tracking unavailable ({redact(uri)}) after {SETUP_ATTEMPTS} tries: {describe(exc)}; fits "
                      "go on, `unziplora registry sync` backfills them", flush=True)
            return job.replace(state={"tracking_error": describe(exc)})
    _say_closed(closed, progress)
    if aliased and progress:
        print(f"the registered models {', '.join(aliased)} still hold an alias per item, which makes every "
              f"registration slower as the library grows: `unziplora registry sync {redact(job.output)}` moves "
              "them to item tags", flush=True)
    return job.replace(state={"mlflow_experiment_id": tracker.experiment_id, "mlflow_parent_run_id": run})


def _say_closed(closed: list[str], progress: bool) -> None:
    if closed and progress:
        print(f"closed {len(closed)} MLflow run(s) of earlier jobs that ended without closing them", flush=True)


def recorded_library(store: Store) -> str | None:
    """The registry prefix registry.json recorded: a library keeps its name, however it is spelled now (a
    library once named through a symlink keeps the link's folder name)."""
    try:
        return store.read_json(REGISTRY_FILE).get("library") if store.exists(REGISTRY_FILE) else None
    except (OSError, ValueError, AttributeError):  # half-written: the default name
        return None


def end_job(job, report: dict, rows: list[dict] | None = None) -> dict:
    """Close the parent run with the job's counts; returns the report's `tracking` entry."""
    if not job.tracking.enabled:
        return {"enabled": False}
    out = {"enabled": True, "tracking_uri": redact(job.tracking.uri), "library": job.tracking.library,
           "parent_run_id": job.state.mlflow_parent_run_id or None, "error": job.state.tracking_error or None}
    if job.state.mlflow_parent_run_id:
        out["closed"] = False
        for attempt in range(SETUP_ATTEMPTS):  # a server that is back within seconds still gets the run closed
            try:
                retrying(lambda: tracker_for(job, job.state.mlflow_experiment_id).end_job(
                    job.state.mlflow_parent_run_id, report, rows))
                out["closed"] = True
                break
            except TrackingStoreGoneError as exc:
                out["error"] = describe(exc)
                break
            except Exception as exc:  # the next job, or `registry sync`, closes it with this report's metrics
                out["error"] = describe(exc)
                if attempt < SETUP_ATTEMPTS - 1:
                    time.sleep(2 ** attempt)
    return out


def abort_job(job, exc: BaseException) -> None:
    """Close the job's parent run on any exit but its end: FAILED for an error, KILLED for an interruption
    (Ctrl-C, SIGTERM from `ray job stop`). Never raises: what cannot be closed now, the next job closes."""
    if not (job.tracking.enabled and job.state.mlflow_parent_run_id):
        return
    status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
    try:
        tracker_for(job, job.state.mlflow_experiment_id).abort_job(job.state.mlflow_parent_run_id, status,
                                                                   describe(exc))
    except Exception:
        pass


_trackers: dict[tuple, Tracker] = {}
_trackers_lock = threading.Lock()


def track_row(job, row: dict) -> dict:
    """The tracking columns of one fit's row (a worker's fit); never raises."""
    if job.state.tracking_error:
        return {"tracking_error": "not tracked: MLflow was unavailable when the job started: "
                                  f"{job.state.tracking_error}"}
    try:
        key = (job.tracking.uri, job.tracking.library, job.output, job.state.mlflow_experiment_id)
        with _trackers_lock:  # batches in flight track from threads
            if key not in _trackers:  # one client per worker process
                _trackers[key] = tracker_for(job, job.state.mlflow_experiment_id)
            tracker = _trackers[key]
        return tracker.track_fit(row, job.state.mlflow_parent_run_id or None)
    except Exception as exc:
        return {"tracking_error": describe(exc)}


def describe(exc: Exception) -> str:
    """An exception as one line of text for a row or the report: a SQLAlchemy error without its statement,
    parameters and links (a multi-line, kilobyte text otherwise)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not line.startswith(NOISE)]
    return scrub(f"{type(exc).__name__}: {'; '.join(kept) or type(exc).__name__}")[:2000]


NOISE = ("[SQL:", "[parameters:", "(Background on this error at:", "(raised as a result of Query-invoked autoflush")
