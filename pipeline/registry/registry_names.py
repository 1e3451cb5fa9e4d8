"""How a library's LoRAs are named in the MLflow model registry; shared by tracking and the style bank.

One registered model per library and kind (`<library>-content`, `<library>-style`); each successful fit is one
version of each. A version is found without knowing its number by its item tag, whose key names the item:
`item-<first 16 hex of id>` = the item id. MLflow's tag table is keyed by (key, model, version), so that search
costs the same at any library size, where an alias per item (the layout before issue 34) made every read of
the model load all of its aliases. MLflow's own `models:/` URIs name a version by number:
`models:/<library>-<kind>/<version>`; `unziplora registry get <library>-<kind>@item-<id>` resolves the item.
"""

from __future__ import annotations

import re

KINDS = ("content", "style")


def library_name(output_uri: str) -> str:
    """The default registry prefix of a library: the last part of its URI, reduced to [A-Za-z0-9_-]."""
    tail = output_uri.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", tail).strip("-") or "library"


def model_name(library: str, kind: str, flavour: str | None = None) -> str:
    """`<library>-<kind>`: versions whose source is the fit's folder; `<library>-<kind>-diffusers`: the same
    LoRAs as mlflow.diffusers models (`--log-diffusers-models`)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return f"{library}-{kind}" + (f"-{flavour}" if flavour else "")


ITEM_KEY = re.compile(r"item-([0-9a-f]{16,24})")


def item_key(item_id: str) -> str:
    """`item-<first 16 hex of the item id>`: the key of the tag that marks an item's versions (its value: the
    whole item id); before issue 34, the name of a per-item alias."""
    return f"item-{item_id[:16]}"


def item_filter(name: str, key: str) -> str:
    """The search_model_versions filter for the item `item-<hex>` in the model `name`: one indexed look-up.
    (A second tag condition would make MLflow scan every version holding that tag: filter on the results.)"""
    match = ITEM_KEY.fullmatch(key)
    if not match:
        raise ValueError(f"not an item key (item-<hex>): {key!r}")
    quote = "'" if "'" not in name else '"'
    if quote in name:
        raise ValueError(f"{name!r} holds both ' and \", which an MLflow filter cannot quote")
    return f"name = {quote}{name}{quote} AND tags.`item-{match[1][:16]}` LIKE '{match[1]}%'"


def item_handle(library: str, kind: str, item_id: str) -> str:
    """`<library>-<kind>@item-<id>`: what `unziplora registry get` takes for an item (it finds the version by
    its item tag); the plain MLflow URI is `models:/<library>-<kind>/<version>`."""
    return f"{model_name(library, kind)}@{item_key(item_id)}"
