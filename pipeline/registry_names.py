"""How a library's LoRAs are named in the MLflow model registry; shared by tracking and the style bank.

One registered model per library and kind (`<library>-content`, `<library>-style`); each successful fit is one
version of each, reachable without knowing its version number through the alias `item-<first 16 hex of id>`.
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


def item_alias(item_id: str) -> str:
    return f"item-{item_id[:16]}"


def model_uri(library: str, kind: str, item_id: str) -> str:
    """`models:/<library>-<kind>@item-<id>`: loads with mlflow.artifacts / `unziplora registry get`."""
    return f"models:/{model_name(library, kind)}@{item_alias(item_id)}"
