"""Judges: small CNNs that name the shape and the style of a toy-world image (offline stand-ins for DINO and
CSD). `python -m toyworld.judges` trains both and writes `toyworld/weights/judges.safetensors` plus a JSON
record of held-out accuracy. The style judge's penultimate features are an image-style embedding.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from toyworld import world

DEFAULT_PATH = Path(__file__).parent / "weights" / "judges.safetensors"
EMBED_DIM = 64


class Judge(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px), global average pooling, one linear layer."""

    def __init__(self, classes: int, width: int = 16):
        super().__init__()

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
                    nn.MaxPool2d(2)]

        self.features = nn.Sequential(*stage(3, width), *stage(width, 2 * width), *stage(2 * width, EMBED_DIM),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(EMBED_DIM, classes)

    def forward(self, x):
        return self.head(self.features(x))


def _prepare(images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W in [-1, 1], any size -> the world's resolution."""
    if images.shape[-1] != world.RESOLUTION or images.shape[-2] != world.RESOLUTION:
        images = F.interpolate(images, size=(world.RESOLUTION,) * 2, mode="area")
    return images.float()


@dataclass
class Judges:
    shape: Judge
    style: Judge

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into world.SHAPE_NAMES and world.STYLE_NAMES."""
        x = _prepare(images)
        return self.shape(x).argmax(-1), self.style(x).argmax(-1)

    @torch.no_grad()
    def style_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The style judge's penultimate features, L2-normalised (compare with a dot product)."""
        return F.normalize(self.style.features(_prepare(images)), dim=-1)


def load_judges(path: str | Path = DEFAULT_PATH) -> Judges:
    tensors = load_file(str(path))
    judges = Judges(Judge(len(world.SHAPES)), Judge(len(world.STYLES)))
    for name in ("shape", "style"):
        module = getattr(judges, name)
        module.load_state_dict({k.split(".", 1)[1]: v.float() for k, v in tensors.items() if k.startswith(name + ".")})
        module.eval().requires_grad_(False)
    return judges


class StyleEmbedder:
    """The style judge as an image embedder for the style bank (pipeline/bank/embedders.py's protocol): the
    offline stand-in for CSD on toy-world libraries,
    `unziplora bank build LIB --image-embedder toyworld.judges:StyleEmbedder` (the class is the factory)."""

    name, spec, kind, dim = "toy-style-judge", "toyworld.judges:StyleEmbedder", "image", EMBED_DIM

    def __init__(self, path: str | Path = DEFAULT_PATH):
        self.judges = load_judges(path)

    def embed(self, images) -> np.ndarray:
        """RGB PIL images, any size or mode -> float32 (len(images), EMBED_DIM), unit rows."""
        images = list(images)
        out = [np.zeros((0, self.dim), np.float32)]
        with torch.no_grad():
            for start in range(0, len(images), 256):
                # each image to the world's resolution first (area), so images of different sizes batch
                batch = torch.cat([_prepare(world.from_pil(im)[None]) for im in images[start:start + 256]])
                out.append(self.judges.style_embedding(batch).numpy().astype(np.float32))  # unit rows already
        return np.concatenate(out)


def accuracy(judges: Judges, batch: world.Batch) -> dict:
    shapes, styles = [], []
    for i in range(0, len(batch.images), 256):
        s, t = judges.classify(batch.images[i:i + 256])
        shapes.append(s)
        styles.append(t)
    shapes, styles = torch.cat(shapes), torch.cat(styles)
    per_style = {name: (styles[batch.styles == i] == i).float().mean().item() for i, name in enumerate(world.STYLE_NAMES)}
    per_shape = {name: (shapes[batch.shapes == i] == i).float().mean().item() for i, name in enumerate(world.SHAPE_NAMES)}
    return dict(shape=(shapes == batch.shapes).float().mean().item(), style=(styles == batch.styles).float().mean().item(),
                per_shape=per_shape, per_style=per_style, n=len(batch.images))


def degraded(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Half of the images slightly blurred, noisy and colour-shifted, each by its own random amount: what a
    VAE decoder does to a generated image. Judges trained on clean renders alone misread such images (the toy
    VAE's faithful reconstructions of 480 held-out images, as tests/test_toyworld.py measures them: 95.8 % style
    accuracy; 98.3 % with this in training)."""
    n = x.shape[0]
    pick = (torch.rand(n, generator=gen) < 0.5).float()[:, None, None, None]
    # blur: a 3x3 binomial kernel mixed in by a random weight (0: sharp, 1: sigma ~0.7 px)
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    w = torch.rand(n, 1, 1, 1, generator=gen)
    y = (1 - w) * x + w * blurred
    gain = 1 + 0.1 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)  # per-channel colour shift, +-10 %
    shift = 0.1 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    noise = 0.03 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    y = (y * gain + shift + noise).clamp(-1, 1)
    return pick * y + (1 - pick) * x


def train_judges(out: str | Path = DEFAULT_PATH, n_train: int = 12000, n_test: int = 2000, epochs: int = 6,
                 batch: int = 64, lr: float = 2e-3, seed: int = 0, threads: int = 1, degrade: bool = True) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    start = time.time()
    # disjoint seeds: the held-out images are never seen in training
    train_set, test_set = world.dataset(seed + 1, n_train), world.dataset(seed + 1_000_001, n_test)
    render_s = time.time() - start
    judges = Judges(Judge(len(world.SHAPES)), Judge(len(world.STYLES)))
    params = [*judges.shape.parameters(), *judges.style.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps = epochs * (n_train // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n_train, generator=gen)
        for i in range(0, n_train - batch + 1, batch):
            idx = order[i:i + batch]
            x = train_set.images[idx]
            if torch.rand((), generator=gen) < 0.5:  # mirror: the world is symmetric enough, judges should be
                x = x.flip(-1)
            if degrade:
                x = degraded(x, gen)
            loss = (F.cross_entropy(judges.shape(x), train_set.shapes[idx])
                    + F.cross_entropy(judges.style(x), train_set.styles[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", flush=True)
    for j in (judges.shape, judges.style):
        j.eval().requires_grad_(False)
    result = dict(held_out=accuracy(judges, test_set), train_s=time.time() - start, render_s=render_s,
                  settings=dict(n_train=n_train, n_test=n_test, epochs=epochs, batch=batch, lr=lr, seed=seed,
                                degrade=degrade))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.half().contiguous() for name in ("shape", "style")
               for k, v in getattr(judges, name).state_dict().items()}
    save_file(tensors, str(out))
    # the record describes the saved (fp16) weights: re-measure after loading them back
    result["held_out"] = accuracy(load_judges(out), test_set)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the toy world's shape and style judges.")
    p.add_argument("--out", default=str(DEFAULT_PATH))
    p.add_argument("--n-train", type=int, default=12000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-degrade", dest="degrade", action="store_false", help="train on clean renders only")
    a = p.parse_args(argv)
    result = train_judges(a.out, a.n_train, a.n_test, a.epochs, seed=a.seed, degrade=a.degrade)
    print(json.dumps(result["held_out"], indent=1))


if __name__ == "__main__":
    main()


class PreviewScorer:
    """The judges as a fit's quality scorer (pipeline/quality/scoring.py's protocol): from a fit's previews, how often
    its content LoRA keeps the source's shape (and leaks its style), and its style LoRA keeps the source's
    style (and leaks its shape). The source's shape and style are what the judges read off the source image.
    The toy world's default scorer: `--scorer toy`, or `toyworld.judges:PreviewScorer`."""

    name, spec = "toy-judges", "toyworld.judges:PreviewScorer"

    def __init__(self, path: str | Path = DEFAULT_PATH):
        self.judges = load_judges(path)

    def score(self, source, content: list, style: list) -> dict[str, float]:
        images = [source, *content, *style]
        shapes, styles = self.judges.classify(torch.cat([_prepare(world.from_pil(im)[None]) for im in images]))
        c, s = slice(1, 1 + len(content)), slice(1 + len(content), len(images))
        out = {}
        if content:
            out |= {"content": (shapes[c] == shapes[0]).float().mean().item(),
                    "content_style_leak": (styles[c] == styles[0]).float().mean().item()}
        if style:
            out |= {"style": (styles[s] == styles[0]).float().mean().item(),
                    "style_shape_leak": (shapes[s] == shapes[0]).float().mean().item()}
        return out
