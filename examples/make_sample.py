"""Draw the built-in samples from the toy world (toyworld/world.py), so the toy base model knows their
shapes and styles: examples/striped_star.png (one image) and examples/sample_set/ (a small collection with
prompts.csv). Rendered at 128 px; fits resize them to the base model's resolution (32 px for `toy`)."""

from pathlib import Path

import numpy as np
from PIL import Image

from toyworld import world

HERE = Path(__file__).parent
SIZE = 128


def draw(shape: str, style: str, seed: int) -> Image.Image:
    factors = world.sample_factors(np.random.default_rng(seed), shape, style)
    return Image.fromarray(world.render(factors, SIZE)[0])


if __name__ == "__main__":
    draw("star", "striped", seed=1).save(HERE / "striped_star.png")
    folder = HERE / "sample_set"
    folder.mkdir(exist_ok=True)
    rows = ["image,content,style"]
    for seed, (shape, style) in enumerate([("star", "striped"), ("circle", "dotted"), ("square", "striped"),
                                           ("star", "dotted")], start=2):
        name = f"{style}_{shape}.png"
        draw(shape, style, seed).save(folder / name)
        rows.append(f"{name},sks {world.SHAPES[shape]},{world.STYLES[style]}")
    (folder / "prompts.csv").write_text("\n".join(rows) + "\n")
