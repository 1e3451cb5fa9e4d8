"""A fit folder's file names, spelled here only (what each file holds: unziplora/export.py's docstring).

A leaf module, so that export, the model card and the pipeline all read the names from one place."""

from __future__ import annotations

from .roles import KINDS

FILES = {kind: f"{kind}_lora.safetensors" for kind in KINDS}  # each LoRA's one file, in the first format
LORA_COPY = "{kind}_lora_{fmt}.safetensors"  # each LoRA in every other format
MERGERS, MASKS = "mergers.safetensors", "masks.safetensors"
RECORD, CONFIG, CARD = "fit.json", "config.yaml", "README.md"
# what a job adds beside them (pipeline/run/worker.py, pipeline/quality/previews.py); the card and tracking read them
PREVIEWS = {kind: f"preview_{kind}.png" for kind in KINDS}
PREVIEW_PROMPTS, SCORES, HISTORY = "previews.json", "scores.json", "history.json"
