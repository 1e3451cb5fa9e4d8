"""`unziplora registry search|get|sync`: find, fetch and backfill the LoRAs of a library in the MLflow registry.

    unziplora registry search "watercolor" --tracking-uri sqlite:///out/library/mlflow.db
    unziplora registry get library-style@item-0123456789abcdef --dest lora/ --tracking-uri ...   # or item-<id>
    unziplora registry sync out/library                 # runs + versions for rows that lack them
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.registry.registry_names import ITEM_KEY, KINDS, item_filter, item_key
from pipeline.run.spec import Failure, Tracking, add_flags, add_storage_options, from_flags
from unziplora import fit_files
from unziplora.config import check_number
from unziplora.errors import InputError
from unziplora.redact import redact

SEARCHED_TAGS = ("style", "content", "class_word", "prompt")


def add_commands(sub) -> None:
    registry = sub.add_parser("registry", help="find, fetch and backfill LoRAs in the MLflow model registry")
    commands = registry.add_subparsers(required=True, metavar="ACTION")

    s = commands.add_parser("search", help="model versions whose style/content/class/prompt contain TEXT")
    s.add_argument("text")
    s.add_argument("--library", help="only this library's models")
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(run=search)

    g = commands.add_parser("get", help="download a LoRA: NAME@item-ID, item-ID (with --kind), NAME@ALIAS, "
                            "NAME/VERSION, NAME (latest) or models:/...")
    g.add_argument("spec")
    g.add_argument("--kind", choices=KINDS, default="style", help="for a bare item-ID: which LoRA (default style)")
    g.add_argument("--dest", required=True, help="folder to write the files to")
    g.set_defaults(run=get)

    y = commands.add_parser("sync", help="backfill runs and registrations of a library from its manifest")
    y.add_argument("library_uri", help="the library (the --output of decompose)")
    # decompose's --library and --log-lora-artifacts (the library's own prefix is recorded by then)
    add_flags(y, Tracking, prefix=None, names=("library", "log_lora_artifacts"),
              helps={"library": "registry prefix (default: registry.json's, else the folder name)"})
    add_storage_options(y)
    y.add_argument("--all", dest="everything", action="store_true",
                   help="check every ok row, not only those without a run or version (e.g. a new server)")
    add_flags(y, Failure, prefix=None, names=("wait_for_library_s",))  # --wait-for-library, as decompose's
    y.set_defaults(run=sync)

    for p in (s, g, y):
        p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                       help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI; for sync also "
                       "the library's registry.json, else sqlite:///<library>/mlflow.db)")


def _client(args):
    if not args.tracking_uri:
        raise InputError("give --tracking-uri (or set MLFLOW_TRACKING_URI), e.g. sqlite:///out/library/mlflow.db")
    from mlflow import MlflowClient  # seconds to import: only once the arguments are known to be good

    return MlflowClient(tracking_uri=args.tracking_uri, registry_uri=args.tracking_uri)


def search(args: argparse.Namespace) -> int:
    check_number("--limit", args.limit, integer=True, minimum=1)
    client = _client(args)
    from pipeline.registry.tracking import literal
    text = args.text
    scope = f" AND name LIKE {literal(args.library + '-%')}" if args.library else ""
    found = {}
    for tag in SEARCHED_TAGS:  # MLflow's filter grammar has no OR: one query per tag
        query = f"tags.{tag} ILIKE {literal(f'%{text}%')}{scope}"
        for v in client.search_model_versions(query, max_results=args.limit):
            found[(v.name, int(v.version))] = v
    for _, v in sorted(found.items())[:args.limit]:
        item = item_key(v.tags["item_id"]) if v.tags.get("item_id") else None  # `registry get NAME@item-...`
        info = {"name": v.name, "version": v.version, "item": item,
                "kind": v.tags.get("kind"), "style": v.tags.get("style"), "content": v.tags.get("content"),
                "item_id": v.tags.get("item_id"), "source_uri": v.tags.get("source_uri"),
                "model_uri": f"models:/{v.name}/{v.version}", "lora_uri": v.tags.get("lora_uri")}
        if args.json:
            print(json.dumps(info))
        else:
            print(f"{v.name}/{v.version}\t@{item}\tstyle={info['style']!r}\tcontent={info['content']!r}\t"
                  f"{info['lora_uri']}")
    if not found:
        print(f"no LoRA matches {args.text!r}", file=sys.stderr)
    return 0


def resolve(client, spec: str, kind: str = "style"):
    """NAME@item-ID (by its item tag), item-ID (the `kind` LoRA of the one library holding it), NAME@ALIAS,
    NAME/VERSION, NAME (its latest version) or models:/... -> the model version."""
    from pipeline.registry.tracking import literal

    spec = spec.removeprefix("models:/")
    if ITEM_KEY.fullmatch(spec):
        return _by_item(client, None, spec, kind)
    if "@" in spec:
        name, alias = spec.split("@", 1)
        if ITEM_KEY.fullmatch(alias):
            found = _by_item(client, name, alias, kind, missing_ok=True)
            if found is not None:
                return found
        # an alias of the user's, or a library still on the old layout (an alias per item)
        return client.get_model_version_by_alias(name, alias)
    if "/" in spec:
        return client.get_model_version(*spec.split("/", 1))
    versions = client.search_model_versions(f"name = {literal(spec)}", order_by=["version_number DESC"], max_results=1)
    if not versions:
        raise InputError(f"no registered model version named {spec!r}")
    return versions[0]


def _by_item(client, name: str | None, key: str, kind: str, missing_ok: bool = False):
    """The version of the model `name` tagged with the item key `item-<hex>`; without a name, the `kind`
    LoRA's folder version among all models (an item of two libraries is ambiguous: name the model)."""
    if name is not None:
        query = item_filter(name, key)
    else:
        hex_ = key.removeprefix("item-")
        query = f"tags.`item-{hex_[:16]}` LIKE '{hex_}%'"
    found = [v for v in client.search_model_versions(query)
             if name is not None or (v.tags.get("kind") == kind and not v.name.endswith("-diffusers"))]
    if len(found) > 1:
        names = ", ".join(sorted(f"{v.name}/{v.version}" for v in found))
        raise InputError(f"{key} names several versions ({names}): give NAME/VERSION")
    if not found and not missing_ok:
        raise InputError(f"no registered {kind} LoRA is tagged {key} (a library registered before item tags: "
                         "`unziplora registry sync` it, or give NAME@item-ID, which also tries the alias)")
    return found[0] if found else None


def get(args: argparse.Namespace) -> int:
    """The version's LoRA file (and its other formats', where the fit has them), fit.json, config.yaml and
    preview; a version whose source
    is the item's whole folder in the library yields only its own kind's files."""
    client = _client(args)  # the tracking URI checked before MLflow is imported
    import mlflow.artifacts

    version = resolve(client, args.spec, args.kind)
    root = client.get_model_version_download_uri(version.name, version.version)
    kind = version.tags.get("kind")
    other = [k for k in KINDS if k != kind]
    names = [Path(a.path).name for a in mlflow.artifacts.list_artifacts(artifact_uri=root,
                                                                        tracking_uri=args.tracking_uri)
             if not a.is_dir]
    wanted = [n for n in names if not any(n.startswith(f"{k}_") or n == fit_files.PREVIEWS[k] for k in other)
              and (n.endswith((".safetensors", ".png")) or n in (fit_files.RECORD, fit_files.CONFIG))
              and n not in (fit_files.MERGERS, fit_files.MASKS)]
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        mlflow.artifacts.download_artifacts(artifact_uri=f"{root.rstrip('/')}/{name}", dst_path=str(dest),
                                            tracking_uri=args.tracking_uri)
    print(json.dumps({"name": version.name, "version": version.version,
                      "model_uri": f"models:/{version.name}/{version.version}", "source": redact(version.source),
                      "files": sorted(str(dest / n) for n in wanted)}, indent=1))
    return 0


def sync(args: argparse.Namespace) -> int:
    from_flags(args, Failure, prefix=None, names=("wait_for_library_s",)).check()
    from pipeline.registry.sync import sync_library

    summary = sync_library(args.library_uri, tracking_uri=args.tracking_uri, library=args.library,
                           storage_options=args.storage_options, log_lora_artifacts=args.log_lora_artifacts,
                           everything=args.everything, wait_s=args.wait_for_library)
    print(json.dumps(summary, indent=1))
    return 1 if summary["errors"] else 0
