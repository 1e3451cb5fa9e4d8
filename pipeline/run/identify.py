"""Item identity: the item id is a hash of the image bytes and a hash of the fit settings, which include the
base model's fingerprint (a hub commit or a content hash: new weights, new items).

Runs in Ray Data tasks over every input, so it imports nothing heavy (no torch, no diffusers).
"""

from __future__ import annotations

import json

from unziplora.config import FitConfig, settings, without_retired
from unziplora.errors import InputError, UnZipLoRAError

from .spec import JobSpec
from ..store.storage import open_url, sha256_hex


def item_config(item: dict, job: JobSpec) -> FitConfig:
    """The job's fit settings, the item's prompts, then the item's overrides from the prompt table."""
    prompts = {f.name: item[f.name] for f in settings("prompt") if item.get(f.name)}
    return FitConfig.from_dict({**job.fit, **prompts, **json.loads(item.get("overrides") or "{}")})


def check_job_settings(fit_settings: dict) -> FitConfig:
    """The job's own fit settings, checked once before any image is read: one clear line, not one failed
    row per image. Returns them as a FitConfig (with stand-in prompts)."""
    fit_settings = without_retired(fit_settings)
    allowed = {f.name for f in settings("item", "worker")}
    misplaced = sorted(set(fit_settings) - allowed)
    if misplaced:
        per_image = sorted(set(misplaced) & {f.name for f in settings("prompt")})
        raise InputError(f"fit settings {misplaced} cannot be set for a whole job" +
                         (f" ({per_image} are per image: prompt-table columns)" if per_image else ""))
    return FitConfig.from_dict({"content": "x", "style": "x"} | fit_settings)


def identify(item: dict, job: JobSpec, image_sha256: str | None = None) -> tuple[dict, bytes | None]:
    """The item's id (hash of its image bytes + hash of its settings), or why it cannot be fitted; and the id
    a library written before fingerprints (manifest schema < 3) gave the same item, when there is one and the
    job may adopt it (`adopt_legacy`).
    With `image_sha256` (what the manifest recorded for a file whose listing stamp has not changed since),
    the image is not read: the bytes returned are None."""
    out = {"item_id": None, "image_sha256": None, "settings_sha256": None, "legacy_item_id": None,
           "error": item.get("prompt_error")}
    if out["error"]:
        return out, None
    data = None
    if image_sha256 is None:
        try:
            data = open_url(item["source_uri"], job.storage_options)
        except Exception as exc:  # missing, permissions, network: the item fails, the job goes on
            return out | {"error": f"cannot read {item['source_uri']}: {exc}"}, None
    try:
        config = item_config(item, job)
    except UnZipLoRAError as exc:
        return out | {"error": str(exc)}, None
    except Exception as exc:  # never a dead job for one item's settings: its row says what went wrong
        return out | {"error": f"{item['source_uri']}: its settings: {type(exc).__name__}: {exc}"}, None
    image_sha = image_sha256 or sha256_hex(data)
    settings_sha = sha256_hex(json.dumps(hashed_settings(config)
                                         | {"base_model_fingerprint": job.state.base_fingerprint}
                                         | job.gate.identity(), sort_keys=True).encode())
    legacy_sha = legacy_settings_sha256(config) if job.adopt_legacy else None  # only adoption looks for it
    return out | {"item_id": _item_id(image_sha, settings_sha), "image_sha256": image_sha,
                  "settings_sha256": settings_sha,
                  "legacy_item_id": _item_id(image_sha, legacy_sha) if legacy_sha else None}, data


def _item_id(image_sha: str, settings_sha: str) -> str:
    return sha256_hex(f"{image_sha}:{settings_sha}".encode())[:24]


# settings that came with base-model fingerprints (schema 3); libraries before them hashed the others alone
ADDED_WITH_FINGERPRINTS = ("revision", "variant", "base_config", "compile")


def hashed_settings(config: FitConfig) -> dict:
    """The settings an item id hashes: all of them. (Settings since retired, config.RETIRED, were left out at the
    value that did nothing, so a library fitted with them there keeps its ids.)"""
    return config.to_dict()


def legacy_settings_sha256(config: FitConfig) -> str | None:
    """The settings hash schema-2 libraries used (no fingerprint, none of the settings added since); None
    when this config uses one of those new settings, which no older fit can have had."""
    values = hashed_settings(config)
    added = [values.pop(name) for name in ADDED_WITH_FINGERPRINTS]
    if any(value not in (None, False) for value in added):
        return None
    return sha256_hex(json.dumps(values, sort_keys=True).encode())


def identify_row(item: dict, job: JobSpec, image_sha256: str | None = None) -> dict:
    """The item row plus its id columns ("" for none: Ray Data rows hold strings)."""
    identity, _ = identify(plain_row(item), job, image_sha256)
    return dict(item) | {k: v or "" for k, v in identity.items()}


def identify_batch(batch: dict, job: dict) -> dict:
    """Ray Data `map_batches` form of `identify_row`: many images per task, only small rows come back."""
    spec = JobSpec(**job)
    return batch_columns([identify_row(item, spec) for item in batch_rows(batch)])


def batch_rows(batch: dict) -> list[dict]:
    """A Ray Data batch (a dict of columns) as rows."""
    return [{k: batch[k][i] for k in batch} for i in range(len(batch["source_uri"]))]


def batch_columns(rows: list[dict]) -> dict:
    """Rows as a Ray Data batch: a column for every key any row has (None where a row lacks it)."""
    columns = dict.fromkeys(k for row in rows for k in row)
    return {k: [r.get(k) for r in rows] for k in columns}


def ids_of(identity: dict) -> dict:
    return {k: identity[k] for k in ("item_id", "image_sha256", "settings_sha256")}


def plain_row(item: dict) -> dict:
    """numpy scalars from a Ray batch -> Python values; "" (no value) -> None."""
    values = {k: (v.item() if hasattr(v, "item") else v) for k, v in item.items()}
    return {k: (None if v == "" else v) for k, v in values.items()}
