"""Item identity: the item id is a hash of the image bytes and a hash of the fit settings.

Runs in Ray Data tasks over every input, so it imports nothing heavy (no torch, no diffusers).
"""

from __future__ import annotations

import json

from unziplora.config import FitConfig
from unziplora.errors import UnZipLoRAError

from .spec import JobSpec
from .storage import open_url, sha256_hex


def item_config(item: dict, job: JobSpec) -> FitConfig:
    """The job's fit settings, the item's prompts, then the item's overrides from the prompt table."""
    prompts = {k: item.get(k) for k in ("content", "style", "class_word", "prompt", "content_prompt",
                                       "style_prompt") if item.get(k)}
    return FitConfig.from_dict({**job.fit, **prompts, **json.loads(item.get("overrides") or "{}")})


def identify(item: dict, job: JobSpec) -> tuple[dict, bytes | None]:
    """The item's id (hash of its image bytes + hash of its settings), or why it cannot be fitted."""
    out = {"item_id": None, "image_sha256": None, "settings_sha256": None, "error": item.get("prompt_error")}
    if out["error"]:
        return out, None
    try:
        data = open_url(item["source_uri"], job.storage_options)
    except Exception as exc:  # missing, permissions, network: the item fails, the job goes on
        return out | {"error": f"cannot read {item['source_uri']}: {exc}"}, None
    try:
        config = item_config(item, job)
    except UnZipLoRAError as exc:
        return out | {"error": str(exc)}, None
    image_sha = sha256_hex(data)
    settings_sha = sha256_hex(json.dumps(config.to_dict(), sort_keys=True).encode())
    item_id = sha256_hex(f"{image_sha}:{settings_sha}".encode())[:24]
    return out | {"item_id": item_id, "image_sha256": image_sha, "settings_sha256": settings_sha}, data


def identify_row(item: dict, job: dict) -> dict:
    """Ray Data `map` form of `identify`: the item row plus its id columns ("" for none)."""
    identity, _ = identify(plain_row(item), JobSpec(**job))
    return dict(item) | {k: v or "" for k, v in identity.items()}


def ids_of(identity: dict) -> dict:
    return {k: identity[k] for k in ("item_id", "image_sha256", "settings_sha256")}


def plain_row(item: dict) -> dict:
    """numpy scalars from a Ray batch -> Python values; "" (no value) -> None."""
    values = {k: (v.item() if hasattr(v, "item") else v) for k, v in item.items()}
    return {k: (None if v == "" else v) for k, v in values.items()}
