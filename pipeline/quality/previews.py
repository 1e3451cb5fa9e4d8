"""Preview images of a fit, stored with its files: what each LoRA does away from its source.

- `preview_style.png`: the style LoRA alone on subjects other than the source's ("A house in watercolor
  painting style"): its style should show, the source's subject should not;
- `preview_content.png`: the content LoRA alone in styles other than the source's ("A sks dog in pencil sketch
  style"): the subject should show, the source's style should not.
Each is a strip of panels, one per prompt, and `previews.json` names the prompts. With a scorer
(pipeline/quality/scoring.py) the panels are scored against the source image into `scores.json`. Few sampling steps
and a fixed seed: a cheap, comparable glimpse (MLflow run, model card, style bank), not a showcase. A preview
that cannot be made never fails the fit.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import traceback
from pathlib import Path

from PIL import Image

from unziplora import fit_files, load_fit
from unziplora.export import FitArtifacts
from unziplora.card import write_model_card
from unziplora.config import FitConfig
from unziplora.generate import generate_each

from .scoring import checked

SEED = 0
PANELS = 3  # subjects (styles) per preview
# panels smaller than this are stored enlarged by a whole factor, each pixel a square block (nearest neighbour:
# nothing made up), so that a 32 px toy preview is not a speck in the MLflow UI, the model card or the gallery;
# the scores are computed from the panels as sampled
MIN_PANEL_PX = 256


def preview_prompts(config: FitConfig, subjects: tuple[str, ...] | list[str], styles: tuple[str, ...] | list[str],
                    panels: int = PANELS) -> dict[str, list[str]]:
    """The prompts of each preview: the first `panels` subjects that are not the source's class word, the
    first styles that are not its style."""
    own_subject, own_style = config.resolved_class_word.lower(), config.style.strip().lower()
    subjects = [s.strip() for s in subjects if s.strip() and s.strip().lower() != own_subject][:panels]
    styles = [s.strip() for s in styles if s.strip() and s.strip().lower() != own_style][:panels]
    return {"content": [f"A {config.content.strip()} in {style} style" for style in styles],
            "style": [f"A {subject} in {config.style.strip()} style" for subject in subjects]}


def strip(images: list[Image.Image], min_height: int = MIN_PANEL_PX) -> Image.Image:
    """Panels side by side, enlarged by the smallest whole factor that makes them at least `min_height` tall."""
    width, height = images[0].size
    scale = max(1, -(-min_height // height))
    out = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        out.paste(image.convert("RGB"), (i * width, 0))
    return out if scale == 1 else out.resize((out.width * scale, out.height * scale), Image.NEAREST)


def write_previews(base, fit_dir: Path, steps: int, *, subjects=None, styles=None, scorer=None,
                   source: bytes | None = None) -> dict:
    """The previews (and, with `scorer` and the `source` image's bytes, the scores) in `fit_dir`; returns
    {"files": names written, "scores": {name: value}}. Subjects and styles default to the base model's."""
    try:
        fit = load_fit(fit_dir)
    except Exception:
        print(f"no preview for {fit_dir}:\n{traceback.format_exc(limit=3)}", file=sys.stderr)
        return {"files": [], "scores": {}}
    drawn = draw_previews(base, fit, steps, subjects=subjects, styles=styles, scorer=scorer, source=source)
    return save_previews(drawn, fit_dir)


def draw_previews(base, fit: FitArtifacts, steps: int, *, subjects=None, styles=None, scorer=None,
                  source: bytes | None = None) -> dict | None:
    """The device's part: the panels of each preview (and their scores), from a fit's files or from one still
    in memory (FitArtifacts.of); None when they cannot be made (a preview never fails the fit)."""
    # diffusers warns on every load that the LoRA has no text-encoder keys: true, and noise in worker logs
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        prompts = preview_prompts(fit.config, subjects or base.preview_subjects, styles or base.preview_styles)
        kinds = [kind for kind in ("content", "style") if prompts[kind]]
        panels = generate_each(base, {kind: fit for kind in kinds}, prompts, steps=steps, seed=SEED)
        scores = {}
        if scorer is not None and source is not None and panels:
            image = Image.open(io.BytesIO(source)).convert("RGB")
            scores = checked(scorer.score(image, panels.get("content", []), panels.get("style", [])))
        return {"panels": panels, "prompts": prompts, "steps": steps, "scores": scores,
                "scorer": scorer.name if scores else None}
    except Exception:
        print(f"no preview for {fit.path or fit.config.content}:\n{traceback.format_exc(limit=3)}", file=sys.stderr)
        return None


def save_previews(drawn: dict | None, fit_dir: Path) -> dict:
    """The CPU's part: the drawn previews as files of the fit's folder (strips, previews.json, scores.json), and
    its model card again, now with them; returns {"files": names written, "scores": {name: value}}."""
    if drawn is None:
        return {"files": [], "scores": {}}
    written = []
    for kind, panels in drawn["panels"].items():
        strip(panels).save(fit_dir / fit_files.PREVIEWS[kind])
        written.append(fit_files.PREVIEWS[kind])
    (fit_dir / fit_files.PREVIEW_PROMPTS).write_text(json.dumps({"prompts": drawn["prompts"],
                                                                 "steps": drawn["steps"], "seed": SEED}))
    written.append(fit_files.PREVIEW_PROMPTS)
    if drawn["scores"]:
        (fit_dir / fit_files.SCORES).write_text(json.dumps({"scorer": drawn["scorer"], "scores": drawn["scores"]}))
        written.append(fit_files.SCORES)
    write_model_card(fit_dir)
    return {"files": written, "scores": drawn["scores"]}
