"""Preview images of a fit, stored with its files: the content LoRA alone and the style LoRA alone.

Few sampling steps and a fixed seed: a cheap, comparable glimpse (for the MLflow run and the style bank),
not a showcase. A preview that cannot be made never fails the fit.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

from unziplora import load_fit
from unziplora.card import write_model_card
from unziplora.generate import generate

SEED = 0


def write_previews(base, fit_dir: Path, steps: int) -> list[str]:
    """`preview_content.png` and `preview_style.png` in `fit_dir` (each with the fit's own prompt)."""
    written = []
    # diffusers warns on every load that the LoRA has no text-encoder keys: true, and noise in worker logs
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        artifacts = load_fit(fit_dir)
        for kind in ("content", "style"):
            image = generate(base, steps=steps, seed=SEED, **{kind: artifacts})[0]
            image.save(fit_dir / f"preview_{kind}.png")
            written.append(f"preview_{kind}.png")
        write_model_card(fit_dir)  # again, now with the previews
    except Exception:  # a sampling problem is not a fit problem
        print(f"no preview for {fit_dir}:\n{traceback.format_exc(limit=3)}", file=sys.stderr)
    return written
