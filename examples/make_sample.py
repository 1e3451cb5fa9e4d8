"""Draw examples/striped_star.png: a star in a striped style, the built-in sample for the default job."""

import math
from pathlib import Path

from PIL import Image, ImageDraw


def striped_star(size: int = 128) -> Image.Image:
    image = Image.new("RGB", (size, size), (238, 232, 220))
    stripes = Image.new("RGB", (size, size), (40, 70, 160))
    draw = ImageDraw.Draw(stripes)
    for x in range(-size, size, 8):  # diagonal stripes, the "style"
        draw.line([(x, 0), (x + size, size)], fill=(230, 120, 40), width=4)
    c, outer, inner = size / 2, size * 0.45, size * 0.2
    points = [(c + (outer if i % 2 == 0 else inner) * math.sin(i * math.pi / 5),
               c - (outer if i % 2 == 0 else inner) * math.cos(i * math.pi / 5)) for i in range(10)]
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)  # the star, the "content"
    image.paste(stripes, mask=mask)
    return image


if __name__ == "__main__":
    striped_star().save(Path(__file__).with_name("striped_star.png"))
