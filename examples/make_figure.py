"""The README's picture, drawn from a finished library (the main job's own output):

    .venv/bin/python examples/make_figure.py out/library docs/img/sample_job.png

One row per fit: its source image, its content LoRA alone in another style and its style LoRA alone on
another subject (the first panel of each preview), and its content recombined with the style of the next fit
whose style differs (three-prompt routing). Images are scaled up without smoothing, so the toy world's 32 px stay sharp.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.store.manifest import read_manifest  # noqa: E402
from pipeline.store.storage import open_url  # noqa: E402
from unziplora import load_fit  # noqa: E402
from unziplora.fit_files import PREVIEW_PROMPTS, PREVIEWS  # noqa: E402
from unziplora.generate import generate  # noqa: E402
from unziplora.models import load_base_model  # noqa: E402

CELL, HEADER, CAPTION = 128, 22, 28


def first_panel(strip: Image.Image) -> Image.Image:
    return strip.crop((0, 0, strip.height, strip.height))


def cell(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((CELL, CELL), Image.NEAREST)


def main(library: str, out: str) -> None:
    rows = sorted((r for r in read_manifest(library).to_pylist() if r["status"] == "ok"),
                  key=lambda r: r["source_uri"])
    if len(rows) < 2:
        raise SystemExit(f"{library} holds {len(rows)} ok fits; the picture needs at least two")
    base = load_base_model(rows[0]["base_model"], device="cpu")
    fits = [load_fit(r["output_uri"]) for r in rows]
    headers = ["source", "content LoRA alone", "style LoRA alone", "content + other style"]
    width, height = CELL * len(headers), HEADER + len(rows) * (CELL + CAPTION)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)  # a scalable font: the tiny bitmap default drops the spaces
    for j, text in enumerate(headers):
        draw.text((j * CELL + 4, 5), text, fill="black", font=font)
    for i, (row, fit) in enumerate(zip(rows, fits)):
        folder = Path(row["output_uri"])
        prompts = json.loads((folder / PREVIEW_PROMPTS).read_text())["prompts"]
        # the next fit (cyclically) in another style: a recombination that shows something
        nxt = next((fits[(i + k) % len(fits)] for k in range(1, len(fits))
                    if fits[(i + k) % len(fits)].config.style != fit.config.style), fits[(i + 1) % len(fits)])
        recombined = generate(base, content=fit, style=nxt, steps=20, seed=0)[0]
        images = [Image.open(io.BytesIO(open_url(row["source_uri"]))),
                  first_panel(Image.open(folder / PREVIEWS["content"])),
                  first_panel(Image.open(folder / PREVIEWS["style"])), recombined]
        short = [p.removeprefix("A ").removesuffix(" style") for p in (prompts["content"][0], prompts["style"][0])]
        captions = [f"{row['content']}, {row['style']}", *short, f"{row['content']}, {nxt.config.style}"]
        top = HEADER + i * (CELL + CAPTION)
        for j, (image, caption) in enumerate(zip(images, captions)):
            sheet.paste(cell(image), (j * CELL, top))
            draw.text((j * CELL + 4, top + CELL + 6), caption[:24], fill="#333", font=font)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    print(f"{out}: {len(rows)} fits, {Path(out).stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
