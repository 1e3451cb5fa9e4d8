"""Draw the built-in samples: examples/striped_star.png (one image) and examples/sample_set/ (a small
collection with prompts.csv) - shapes as the content, fill patterns as the style."""

import math
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
BACKGROUND = (238, 232, 220)


def shape_mask(shape: str, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c, r = size / 2, size * 0.42
    if shape == "star":
        points = [(c + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                   c - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(points, fill=255)
    elif shape == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
    else:  # square
        draw.rectangle([c - r * 0.8, c - r * 0.8, c + r * 0.8, c + r * 0.8], fill=255)
    return mask


def pattern(style: str, size: int) -> Image.Image:
    tile = Image.new("RGB", (size, size), (40, 70, 160))
    draw = ImageDraw.Draw(tile)
    if style == "striped":
        for x in range(-size, size, 8):
            draw.line([(x, 0), (x + size, size)], fill=(230, 120, 40), width=4)
    else:  # dotted
        for y in range(3, size, 9):
            for x in range(3, size, 9):
                draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=(250, 210, 60))
    return tile


def draw(shape: str, style: str, size: int = 128) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    image.paste(pattern(style, size), mask=shape_mask(shape, size))
    return image


if __name__ == "__main__":
    draw("star", "striped").save(HERE / "striped_star.png")
    folder = HERE / "sample_set"
    folder.mkdir(exist_ok=True)
    rows = ["image,content,style"]
    for shape, style in [("star", "striped"), ("circle", "dotted"), ("square", "striped"), ("star", "dotted")]:
        name = f"{style}_{shape}.png"
        draw(shape, style).save(folder / name)
        rows.append(f"{name},sks {shape},{style} pattern")
    (folder / "prompts.csv").write_text("\n".join(rows) + "\n")
