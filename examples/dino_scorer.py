"""Your own quality scorer: DINOv2 from a local weights folder, plugged in with `--scorer examples.dino_scorer:scorer`.

    export DINO_SCORER_DIR=/models/dinov2-small   # a transformers DINOv2 checkpoint; nothing is downloaded
    PYTHONPATH=. unziplora decompose --input ... --output ... --base-model /models/sdxl \
        --scorer examples.dino_scorer:scorer

A scorer is any object with `name` and `score(source, content_panels, style_panels) -> {name: float}`
(pipeline/quality/scoring.py). This one compares each panel with the source image in two ways:
- what it shows: the cosine of DINOv2's image (CLS) features, which follow objects and layout;
- how it is drawn: the cosine of the Gram matrices of its patch features (the classic style descriptor).
content = what the content LoRA's panels show, style = how the style LoRA's panels are drawn; the leaks are the
other way round. These are similarities, not shares of panels: they rank a fit's candidates, but a
`--min-split-score` bar must be set on your own images. The module must be importable where the job runs
(`ray job submit --working-dir .` ships it).
"""

from __future__ import annotations

import os

import numpy as np
import torch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as DINOv2 was trained


class DinoScorer:
    def __init__(self, path: str):
        from transformers import Dinov2Model

        self.model = Dinov2Model.from_pretrained(path, local_files_only=True).eval()
        self.size = self.model.config.image_size
        self.name = "dino-" + os.path.basename(os.path.normpath(path))

    @torch.no_grad()
    def features(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Per image: the unit CLS vector and the unit flattened Gram matrix of the patch features."""
        pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((self.size, self.size)),
                                                          dtype=np.float32)).permute(2, 0, 1) / 255 for im in images])
        pixels = (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        states = self.model(pixel_values=pixels).last_hidden_state
        cls, patches = states[:, 0], states[:, 1:]
        gram = (patches.transpose(1, 2) @ patches / patches.shape[1]).flatten(1)
        unit = lambda x: torch.nn.functional.normalize(x.float(), dim=-1).numpy()  # noqa: E731
        return unit(cls), unit(gram)

    def score(self, source, content: list, style: list) -> dict[str, float]:
        what, how = self.features([source, *content, *style])
        c, s = slice(1, 1 + len(content)), slice(1 + len(content), None)
        out = {}
        if content:
            out |= {"content": float(np.mean(what[c] @ what[0])), "content_style_leak": float(np.mean(how[c] @ how[0]))}
        if style:
            out |= {"style": float(np.mean(how[s] @ how[0])), "style_shape_leak": float(np.mean(what[s] @ what[0]))}
        return out


def scorer() -> DinoScorer:
    path = os.environ.get("DINO_SCORER_DIR")
    if not path:
        raise ValueError("set DINO_SCORER_DIR to a local DINOv2 checkpoint folder (transformers format)")
    return DinoScorer(path)
