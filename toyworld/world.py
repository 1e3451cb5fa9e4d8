"""A procedural world with known factors: content = a shape, style = how it is rendered.

Every image is one shape in one style, plus nuisance factors (position, size, rotation, colours, pattern
phase, noise) drawn from a seeded generator, so the ground truth of each image is known exactly.
Prompts follow the paper's form: "a star in dotted style".

Rendering is done at `SUPERSAMPLE` x the output size and averaged down, which antialiases edges without
blurring the patterns; pattern sizes are given in output pixels at 32 px and scale with the resolution.
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

# content: shape -> class word (the word used in prompts)
SHAPES = {"circle": "circle", "square": "square", "triangle": "triangle", "star": "star", "cross": "cross",
          "heart": "heart"}
# style: name -> description used in prompts ("a heart in noisy watercolor style")
STYLES = {"flat": "flat", "striped": "striped", "dotted": "dotted", "outlined": "outlined",
          "checkered": "checkered", "watercolor": "noisy watercolor"}
SHAPE_NAMES = tuple(SHAPES)
STYLE_NAMES = tuple(STYLES)
RESOLUTION = 32  # the toy model's image size (see TOYWORLD.md: 32 px trains in an hour or two on CPU)
SUPERSAMPLE = 4


def prompt(shape: str, style: str) -> str:
    return f"a {SHAPES[shape]} in {STYLES[style]} style"


@dataclass(frozen=True)
class Factors:
    """Everything that determines one image (render(f) is a pure function of it)."""

    shape: str
    style: str
    cx: float  # centre, fraction of the image side
    cy: float
    size: float  # half-extent of the shape, fraction of the image side
    angle: float  # rotation, radians
    fg: tuple[float, float, float]  # RGB in [0, 1]
    bg: tuple[float, float, float]
    phase: tuple[float, float]  # pattern offset, fraction of one period
    noise_seed: int  # for the watercolor texture

    @property
    def prompt(self) -> str:
        return prompt(self.shape, self.style)

    def to_dict(self) -> dict:
        return asdict(self)


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def sample_factors(rng: np.random.Generator, shape: str | None = None, style: str | None = None) -> Factors:
    """Random factors; `shape`/`style` fix the content or the style."""
    shape = shape or SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))]
    style = style or STYLE_NAMES[rng.integers(len(STYLE_NAMES))]
    size = rng.uniform(0.26, 0.38)
    slack = 0.47 - size  # keep the whole shape (with rotation) inside the frame
    cx, cy = 0.5 + rng.uniform(-slack, slack, 2)
    angle = rng.uniform(-np.pi / 12, np.pi / 12)
    fg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.45, 0.95))
    # background: a light or a dark plain colour, always far enough from the foreground in brightness that
    # the shape (and the tint its patterns use) stays visible
    while True:
        if rng.uniform() < 0.6:
            bg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.85, 1.0))
        else:
            bg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.2))
        if abs(_luma(fg) - _luma(bg)) > 0.3:
            break
    return Factors(shape, style, float(cx), float(cy), float(size), float(angle),
                   tuple(float(c) for c in fg), tuple(float(c) for c in bg),
                   tuple(float(p) for p in rng.uniform(0, 1, 2)), int(rng.integers(2**31)))


# ---- shapes: inside tests in the shape's own frame (x right, y up, unit half-extent) ----

def _star(x, y, points=5, inner=0.45):
    # ray from the centre meets the straight edge between a tip (r=1) and a valley (r=inner)
    sector = 2 * np.pi / points
    phi = np.mod(np.arctan2(y, x) - np.pi / 2, sector)
    phi = np.minimum(phi, sector - phi)  # angle from the nearest tip, in [0, sector/2]
    p1 = np.array([1.0, 0.0])
    p2 = inner * np.array([np.cos(sector / 2), np.sin(sector / 2)])
    e = p2 - p1
    edge_r = (p1[0] * e[1] - p1[1] * e[0]) / (np.cos(phi) * e[1] - np.sin(phi) * e[0])
    return np.hypot(x, y) <= edge_r


def _heart(x, y):
    x, y = 1.15 * x, 1.15 * y + 0.12
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


_SHAPE_FNS = {
    "circle": lambda x, y: x * x + y * y <= 1,
    "square": lambda x, y: np.maximum(np.abs(x), np.abs(y)) <= 0.82,
    "triangle": lambda x, y: (y >= -0.6) & (1.6 * np.abs(x) + y <= 1),
    "star": _star,
    "cross": lambda x, y: ((np.abs(x) <= 0.32) & (np.abs(y) <= 1)) | ((np.abs(y) <= 0.32) & (np.abs(x) <= 1)),
    "heart": _heart,
}


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n) + 0.5) / n
    return np.meshgrid(c, c)  # px (columns), py (rows), fractions of the side


def shape_mask(f: Factors, n: int) -> np.ndarray:
    """The shape's exact inside test on an n x n grid (bool), independent of the style."""
    px, py = _grid(n)
    dx, dy = px - f.cx, py - f.cy
    cos, sin = np.cos(f.angle), np.sin(f.angle)
    x = (cos * dx + sin * dy) / f.size
    y = -(-sin * dx + cos * dy) / f.size  # image rows grow downwards; shapes are drawn y-up
    return _SHAPE_FNS[f.shape](x, y)


# ---- styles: per-pixel foreground colour weight (0 = background, 1 = fg) and an optional tint weight ----

def _pool(a: np.ndarray, k: int) -> np.ndarray:
    n = a.shape[0] // k
    return a.reshape(n, k, n, k, *a.shape[2:]).mean(axis=(1, 3))


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (-F.max_pool2d(-m, 2 * radius + 1, stride=1, padding=radius))[0, 0].numpy() > 0.5


def _smooth_noise(seed: int, n: int, cells: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, cells, cells, generator=g)
    return F.interpolate(coarse, size=(n, n), mode="bicubic", align_corners=False)[0, 0].numpy()


def render(f: Factors, resolution: int = RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """The image (uint8, H x W x 3) and the shape's mask at the output size (bool, pixel more than half inside)."""
    k = SUPERSAMPLE
    n = resolution * k
    unit = n / 32  # one output pixel at 32 px, in supersampled pixels
    inside = shape_mask(f, n)
    px, py = [g * n for g in _grid(n)]
    fg, bg = np.array(f.fg), np.array(f.bg)
    tint = 0.5 * fg + 0.5 * bg  # the pattern's second colour: always between fg and bg
    ox, oy = f.phase[0], f.phase[1]
    # alpha: weight of the "ink" (fg) per pixel; tint_w: weight of the tint where there is no ink
    if f.style == "flat":
        ink, tint_w = inside, np.zeros_like(inside)
    elif f.style == "striped":  # diagonal stripes, period 4 px, half of it ink
        band = np.mod((px + py) / (4 * unit * np.sqrt(2)) + ox, 1.0) < 0.5
        ink, tint_w = inside & band, inside & ~band
    elif f.style == "dotted":  # dots of radius 1 px on a 4 px grid
        period = 4 * unit
        ddx = np.mod(px / period + ox, 1.0) - 0.5
        ddy = np.mod(py / period + oy, 1.0) - 0.5
        dot = np.hypot(ddx, ddy) * period <= 1.05 * unit
        ink, tint_w = inside & dot, inside & ~dot
    elif f.style == "checkered":  # 3 px squares
        period = 3 * unit
        check = (np.floor(px / period + ox) + np.floor(py / period + oy)) % 2 == 0
        ink, tint_w = inside & check, inside & ~check
    elif f.style == "outlined":  # a 1.5 px contour, empty inside
        ink, tint_w = inside & ~_erode(inside, int(round(1.5 * unit))), np.zeros_like(inside)
    elif f.style == "watercolor":  # soft, bleeding edge; blotchy pigment; grainy paper
        blur = torch.from_numpy(inside.astype(np.float32))[None, None]
        r = int(round(1.5 * unit))
        blur = F.avg_pool2d(F.pad(blur, (r,) * 4, mode="replicate"), 2 * r + 1, stride=1)[0, 0].numpy()
        pigment = 0.55 + 0.45 * _smooth_noise(f.noise_seed, n, 6)
        ink, tint_w = blur * np.clip(pigment, 0, 1), np.zeros_like(blur)
    else:
        raise KeyError(f"unknown style {f.style}")
    ink = ink.astype(np.float32)[..., None]
    tint_w = tint_w.astype(np.float32)[..., None]
    img = ink * fg + tint_w * tint + (1 - ink - tint_w) * bg
    img = _pool(img, k)
    if f.style == "watercolor":
        grain = np.random.default_rng(f.noise_seed).normal(0, 0.05, img.shape)
        img = img + grain
    mask = _pool(inside.astype(np.float32), k) > 0.5
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask


@dataclass
class Batch:
    images: torch.Tensor  # B x 3 x H x W in [-1, 1]
    shapes: torch.Tensor  # class indices into SHAPE_NAMES
    styles: torch.Tensor  # class indices into STYLE_NAMES
    factors: list[Factors]

    @property
    def prompts(self) -> list[str]:
        return [f.prompt for f in self.factors]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1


def from_pil(image) -> torch.Tensor:
    """A PIL image (any mode) -> 3 x H x W in [-1, 1]."""
    return to_tensor(np.array(image.convert("RGB")))  # np.array: a writable copy, as torch wants


def to_pil(image: torch.Tensor):
    """3 x H x W in [-1, 1] -> a PIL image (what a user would save and fit)."""
    from PIL import Image

    return Image.fromarray(((image.clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(1, 2, 0).numpy())


def sample_batch(rng: np.random.Generator, n: int, resolution: int = RESOLUTION, shape: str | None = None,
                 style: str | None = None) -> Batch:
    return batch_of([sample_factors(rng, shape, style) for _ in range(n)], resolution)


def batch_of(factors: list[Factors], resolution: int = RESOLUTION) -> Batch:
    """The rendered images of `factors`, with their class labels."""
    images = torch.stack([to_tensor(render(f, resolution)[0]) for f in factors])
    return Batch(images, torch.tensor([SHAPE_NAMES.index(f.shape) for f in factors]),
                 torch.tensor([STYLE_NAMES.index(f.style) for f in factors]), factors)


def dataset(seed: int, n: int, resolution: int = RESOLUTION) -> Batch:
    """A fixed set: the same seed gives the same images. Held-out sets use seeds the training never uses."""
    return sample_batch(np.random.default_rng(seed), n, resolution)
