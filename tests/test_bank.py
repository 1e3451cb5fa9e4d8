"""The style bank on a small synthetic library (a real manifest, real PNGs, fake LoRA bytes): text search finds
the planted matches first, builds are incremental, image-by-example search, filters, `generate --content/--style`
resolution through a bank, a library on S3 (moto), and the gallery rendered in headless Chromium."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from jobs import cli
from pipeline.store import layout
from pipeline.bank import Bank, build_bank, load_embedder, write_gallery
from pipeline.bank.search import FIT_FILES
from pipeline.store.manifest import empty_row, ok_row, write_manifest
from pipeline.registry.registry_names import item_handle
from pipeline.store.storage import Store
from unziplora.errors import InputError
from unziplora.fit_files import CARD, FILES, PREVIEWS

WATERCOLOR = ["loose watercolor wash with black ink linework", "watercolor painting with pen and ink outlines"]
OTHERS = ["neon cyberpunk city glow", "thick impasto oil painting", "8-bit pixel art", "low-poly 3D render",
          "pencil sketch with cross-hatching", "ukiyo-e woodblock print", "art deco poster, flat colors",
          "claymation stop motion"]
INJECTED = '<script>document.title="pwned"</script> & "quoted" ink'


def style_image(style: int, seed: int, size: int = 48) -> bytes:
    """An image whose statistics depend on `style` (base colour, noise amplitude, stripe period), the pixels on
    `seed`: two seeds of one style look alike to a style embedder, two styles do not."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(1000 + style).integers(30, 220, 3)
    amplitude, period = 10 + 12 * (style % 5), 3 + 2 * (style % 4)
    stripes = (np.arange(size)[:, None] // period % 2) * 40
    pixels = base + stripes[..., None] + rng.normal(0, amplitude, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def make_items(styles: list[str], start: int = 0, run_id: str = "run-a") -> list[dict]:
    """Items (style index, description, class, base model, date) for `write_library`."""
    classes = ["dog", "cat", "house"]
    return [{"n": start + i, "style": s, "class_word": classes[(start + i) % 3], "run_id": run_id,
             "base_model": "tiny" if (start + i) % 2 == 0 else "stabilityai/stable-diffusion-xl-base-1.0",
             "finished_at": f"2026-11-{10 + (start + i) % 10:02d}T12:00:00Z"} for i, s in enumerate(styles)]


def write_library(root: str, items: list[dict], storage_options=None, failed: int = 0) -> list[dict]:
    """Source PNGs under <root>-input/, item folders and a manifest under root; returns the manifest rows."""
    store, inputs = Store(root, storage_options), Store(root.rstrip("/") + "-input", storage_options)
    rows = []
    for item in items:
        n, image = item["n"], style_image(item["n"], seed=item["n"])
        inputs.write_bytes(image, f"img{n:03d}.png")
        item_id = hashlib.sha256(image).hexdigest()
        files = {}
        names = list(FIT_FILES) + ([PREVIEWS["style"]] if n % 2 == 0 else [])
        for name in names:
            data = style_image(n, seed=99) if name.endswith(".png") else f"{name} of {n}".encode()
            store.write_bytes(data, *layout.item(item_id, name))
            files[name] = {"uri": store.url(*layout.item(item_id, name)), "sha256": hashlib.sha256(data).hexdigest(),
                           "bytes": len(data)}
        # the row a fit's would be (manifest.ok_row) of a stand-in result: what the bank reads, the rest empty
        config = SimpleNamespace(content=f"sks {item['class_word']}", style=item["style"],
                                 resolved_class_word=item["class_word"], rank=None, steps=None, resolution=None,
                                 seed=None)
        record = {"prompts": {"combined": f"A sks {item['class_word']} in {item['style']} style", "content": None,
                              "style": None}, "final": {"loss": None, "mse": None, "ortho": None}, "mask_stats": None,
                  "timings": {"train_s": None, "total_s": None}, "base_model": item["base_model"],
                  "base_model_fingerprint": None}
        rows.append(ok_row({"source_uri": inputs.url(f"img{n:03d}.png")}, {"item_id": item_id, "image_sha256": item_id},
                           SimpleNamespace(config=config, record=record), files, run_id=item["run_id"],
                           finished_at=item["finished_at"], mask_stats=None,
                           # quality scores (pipeline/quality/scoring.py); every fourth fit unscored
                           score_style=None if n % 4 == 3 else (n % 4) / 3, score_content=0.9,
                           score_content_style_leak=0.05 if n % 2 else 0.3, score_style_shape_leak=0.0))
    for i in range(failed):
        rows.append(empty_row(inputs.url(f"broken{i}.png")) | {"status": "failed", "error": "not an image",
                                                                  "style": WATERCOLOR[0], "content": "sks dog"})
    return rows


def publish(root, rows, run_id, storage_options=None):
    write_manifest(Store(root, storage_options), rows, run_id)


class Counting:
    """Wraps an embedder and remembers every item it was asked to embed."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.name, self.spec, self.kind, self.dim = inner.name, inner.spec, inner.kind, inner.dim

    def embed(self, items):
        self.seen += list(items) if self.kind == "text" else [np.asarray(i).tobytes() for i in items]
        return self.inner.embed(items)


class Dying(Counting):
    """Embeds one batch, then dies like a killed build."""

    def embed(self, items):
        if self.seen:
            raise RuntimeError("killed")
        return super().embed(items)


@pytest.fixture(scope="module")
def minilm():
    return load_embedder("minilm")


@pytest.fixture(scope="module")
def library(tmp_path_factory, minilm):
    """A local library: 10 items (2 watercolor-with-ink, the injected one, 7 others), 1 failed row; built."""
    root = str(tmp_path_factory.mktemp("bank") / "library")
    items = make_items([WATERCOLOR[0], *OTHERS[:4], INJECTED, WATERCOLOR[1], *OTHERS[4:7]])
    rows = write_library(root, items, failed=1)
    publish(root, rows, "run-a")
    build_bank(root, text_embedder=minilm, image_embedders=["tiny"])
    return root


def test_text_search_finds_planted_matches_first(library, minilm):
    bank = Bank(library)
    hits = bank.search("soft watercolor with ink outlines", k=3, text_embedder=minilm)
    assert {h["style"] for h in hits[:2]} == set(WATERCOLOR), [(h["style"], h["score"]) for h in hits]
    assert hits[0]["score"] >= hits[1]["score"] > hits[2]["score"]
    hit = hits[0]
    assert hit["status"] == "ok" and hit["style_lora_uri"].endswith("/".join(layout.item(hit["item_id"], FILES["style"])))
    assert hit["registry"] == {"content": item_handle("library", "content", hit["item_id"]),
                               "style": item_handle("library", "style", hit["item_id"])}
    # the failed row has a watercolor description too, but no LoRAs: only `status="any"` shows it
    assert all(h["status"] == "ok" for h in bank.search(WATERCOLOR[0], k=20, text_embedder=minilm))
    assert "failed" in {h["status"] for h in bank.search(WATERCOLOR[0], k=3, text_embedder=minilm, status="any")}
    dogs = bank.search("a puppy", field="content", k=20, text_embedder=minilm)
    assert dogs[0]["class_word"] == "dog"


def test_filters(library, minilm):
    bank = Bank(library)
    query = dict(text="soft watercolor with ink outlines", k=20, text_embedder=minilm)
    everything = bank.search(**query)
    assert len(everything) == 10
    for hits, check in [
        (bank.search(**query, class_word="DOG"), lambda h: h["class_word"] == "dog"),
        (bank.search(**query, base_model="tiny"), lambda h: h["base_model"] == "tiny"),
        (bank.search(**query, since="2026-11-15", until="2026-11-17"),
         lambda h: "2026-11-15" <= h["finished_at"][:10] <= "2026-11-17"),
        (bank.search(**query, run="run-a"), lambda h: True),
    ]:
        expected = [h["item_id"] for h in everything if check(h)]
        assert [h["item_id"] for h in hits] == expected and hits
    assert bank.search(**query, run="no-such-run") == []
    # quality: unscored fits never pass a bound
    for bounds, check in [
        (dict(min_style_score=0.5), lambda h: h["score_style"] is not None and h["score_style"] >= 0.5),
        (dict(max_leak=0.1), lambda h: h["score_content_style_leak"] <= 0.1),
        (dict(min_style_score=0.3, max_leak=0.1, min_content_score=0.8),
         lambda h: (h["score_style"] or 0) >= 0.3 and h["score_content_style_leak"] <= 0.1),
    ]:
        hits = bank.search(**query, **bounds)
        assert [h["item_id"] for h in hits] == [h["item_id"] for h in everything if check(h)] and hits, bounds
    assert bank.search(**query, min_content_score=0.95) == []
    newest = bank.search(k=3, class_word="cat")  # no query: metadata only, newest first
    assert [h["class_word"] for h in newest] == ["cat"] * 3 and newest[0]["score"] is None
    assert newest[0]["finished_at"] >= newest[1]["finished_at"] >= newest[2]["finished_at"]


def test_image_example_search_with_tiny_encoder(library, minilm):
    bank = Bank(library)
    for style in (3, 6):  # a new picture (another seed) in the style of item `style`
        hits = bank.search(image=style_image(style, seed=12345), k=3)
        assert hits[0]["source_uri"].endswith(f"img{style:03d}.png"), [h["source_uri"] for h in hits]
        assert set(hits[0]["scores"]) == {"image"}
    both = bank.search("soft watercolor with ink outlines", image=style_image(6, seed=7), k=1, text_embedder=minilm)
    assert both[0]["style"] == WATERCOLOR[1] and set(both[0]["scores"]) == {"text", "image"}


def test_clip_vision_embedder_from_local_weights(tmp_path):
    """The CLIP path is real: a tiny random CLIP vision model saved the way a user's local copy would be."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=16, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "clip")
    embedder = load_embedder(f"clip:{tmp_path / 'clip'}")
    images = [Image.open(io.BytesIO(style_image(s, seed=s))) for s in (1, 2)]
    vectors = embedder.embed(images)
    assert vectors.shape == (2, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert embedder.name == "clip-clip" and load_embedder(embedder.spec).dim == 16

    root = str(tmp_path / "library")
    publish(root, write_library(root, make_items(OTHERS[:4])), "run-a")
    build_bank(root, text_embedder=None, image_embedders=[embedder.spec])
    hits = Bank(root).search(image=style_image(2, seed=2), k=4)  # item 2's own source image
    assert hits[0]["style"] == OTHERS[2] and hits[0]["score"] == pytest.approx(1, abs=1e-5)


class Judge:
    """A third-party style judge: any object with these five members (here: a grey-level histogram)."""

    name, spec, kind, dim = "grey-judge", "test_bank:Judge", "image", 16

    def embed(self, images):
        hist = [np.histogram(np.asarray(im.convert("L")), bins=16, range=(0, 256))[0] + 1.0 for im in images]
        return np.asarray(hist, np.float32) / np.linalg.norm(hist, axis=1, keepdims=True)


def test_third_party_embedder_plugs_in(tmp_path):
    root = str(tmp_path / "library")
    publish(root, write_library(root, make_items(OTHERS[:4])), "run-a")
    build_bank(root, text_embedder=None, image_embedders=["test_bank:Judge"])  # `module:factory`
    bank = Bank(root)
    assert bank.meta["embedders"] == {"grey-judge": {"spec": "test_bank:Judge", "kind": "image", "dim": 16}}
    hits = bank.search(image=style_image(1, seed=1), k=1)  # the judge is found again from bank.json
    assert hits[0]["style"] == OTHERS[1] and hits[0]["score"] == pytest.approx(1, abs=1e-5)


def test_incremental_build(tmp_path, minilm):
    root = str(tmp_path / "library")
    first = make_items([WATERCOLOR[0], OTHERS[0], OTHERS[1]])
    rows = write_library(root, first)
    publish(root, rows, "run-a")
    text, image = Counting(minilm), Counting(load_embedder("tiny"))
    build_bank(root, text_embedder=text, image_embedders=[image])
    assert sorted(text.seen) == sorted({i["style"] for i in first} | {i["class_word"] for i in first})
    assert len(image.seen) == 3
    parts = sorted(Path(root, "bank", "embeddings", minilm.name).iterdir())
    before = {p.name: p.read_bytes() for p in parts}

    # a second job: the manifest is rewritten with old + new rows; one new style, one repeated description
    second = make_items([OTHERS[2], OTHERS[0]], start=3, run_id="run-b")
    rows += write_library(root, second)
    publish(root, rows, "run-b")
    text.seen, image.seen = [], []
    summary = build_bank(root, text_embedder=text, image_embedders=[image])
    assert text.seen == [OTHERS[2]]  # "cat"/"dog"/"house" and OTHERS[0] already have vectors
    assert len(image.seen) == 2 and summary["added"] == {minilm.name: 1, "tiny-style-0": 2}
    after = sorted(Path(root, "bank", "embeddings", minilm.name).iterdir())
    assert len(after) == 2 and {p.name: p.read_bytes() for p in after if p.name in before} == before
    text.seen = []
    assert build_bank(root, text_embedder=text, image_embedders=[image])["added"][minilm.name] == 0
    assert text.seen == []

    hits = Bank(root).search(OTHERS[2], k=1, text_embedder=minilm)
    assert hits[0]["style"] == OTHERS[2] and hits[0]["run_id"] == "run-b"
    meta = json.loads(Path(root, "bank", "bank.json").read_text())
    assert meta["embedders"]["tiny-style-0"]["spec"] == "tiny:0" and len(meta["builds"]) == 3


def test_interrupted_build_resumes(tmp_path, minilm, monkeypatch):
    """Vectors are written in parts as they are made: a build that dies keeps its finished parts."""
    root = str(tmp_path / "library")
    publish(root, write_library(root, make_items(OTHERS[:5])), "run-a")
    monkeypatch.setattr("pipeline.bank.index.PART_SIZE", 4)
    text, failing = Counting(minilm), Dying(minilm)
    with pytest.raises(RuntimeError, match="killed"):
        build_bank(root, text_embedder=failing)
    assert len(list(Path(root, "bank", "embeddings", minilm.name).iterdir())) == 1
    build_bank(root, text_embedder=text)
    assert len(text.seen) == 8 - 4 and not set(text.seen) & set(failing.seen)  # 5 styles + 3 classes in all
    assert len(list(Path(root, "bank", "embeddings", minilm.name).iterdir())) == 2


def test_unindexed_rows_are_reported_not_matched(tmp_path, minilm):
    root = str(tmp_path / "library")
    rows = write_library(root, make_items([WATERCOLOR[0]]))
    publish(root, rows, "run-a")
    build_bank(root, text_embedder=minilm)
    rows += write_library(root, make_items([WATERCOLOR[1]], start=1))
    publish(root, rows, "run-b")  # a new job, no `bank build` yet
    Path(root, "registry.json").write_text(json.dumps({"library": "tracked-name"}))  # as tracking writes it
    bank = Bank(root)
    assert bank.unindexed("style", minilm) == 1
    hits = bank.search(WATERCOLOR[1], k=5, text_embedder=minilm)
    assert [h["style"] for h in hits] == [WATERCOLOR[0]]
    assert hits[0]["registry"]["style"] == item_handle("tracked-name", "style", hits[0]["item_id"])


def test_cli_build_search_and_generate_resolution(library, tmp_path, capsys, monkeypatch):
    assert cli.main(["bank", "build", library]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == {"all-MiniLM-L6-v2": 0}
    assert cli.main(["bank", "search", library, "soft watercolor with ink outlines", "-k", "2"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {h["style"] for h in hits} == set(WATERCOLOR) and hits[0]["registry"].startswith("library-style@item-")

    # generate: --content by item id prefix, --style by a text query; the real `generate` run is replaced
    seen = {}
    monkeypatch.setattr("unziplora.cli._generate", lambda args: seen.update(vars(args)) or 0)
    parser = cli.build_parser()  # built after the patch, so its `generate` wraps the stand-in
    cat = Bank(library).search(k=1, class_word="cat")[0]
    args = parser.parse_args(["generate", "--bank", library, "--content", cat["item_id"][:10],
                              "--style", "ink and watercolour", "--out", str(tmp_path / "x.png")])
    assert args.run(args) == 0
    assert Path(seen["content_from"]) == Path(cat["output_uri"])  # a local library's item folder, used in place
    style_dir = Path(seen["style_from"])
    assert json.loads(capsys.readouterr().err.splitlines()[-1])["text"] in WATERCOLOR
    assert (style_dir / FILES["style"]).read_bytes().startswith(b"style_lora.safetensors of")
    with pytest.raises(InputError, match="not a fit directory"):
        args = parser.parse_args(["generate", "--style", "watercolor", "--out", str(tmp_path / "y.png")])
        args.run(args)


def test_generate_from_bank_end_to_end(tiny_base, sample_image, tmp_path, capsys, minilm):
    """Two real tiny fits in a library; `generate` takes the content of one by id and the style of the other
    by a text query."""
    from unziplora import FitConfig, fit

    root, rows, ids = tmp_path / "library", [], []
    for style in ("ink wash with soft watercolor", "neon glow"):
        item_id = hashlib.sha256(style.encode()).hexdigest()
        folder = root / layout.ITEMS / item_id
        fit(sample_image, FitConfig(content="sks dog", style=style, steps=3, rank=2), base=tiny_base,
            out_dir=folder, progress=False)
        files = {p.name: {"uri": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                          "bytes": p.stat().st_size} for p in folder.iterdir()}
        rows.append(empty_row(str(sample_image)) | {"item_id": item_id, "status": "ok", "content": "sks dog",
                                                    "style": style, "files": json.dumps(files),
                                                    "output_uri": str(folder)})
        ids.append(item_id)
    publish(str(root), rows, "run-a")
    build_bank(str(root), text_embedder=minilm)
    out = tmp_path / "recombined.png"
    assert cli.main(["generate", "--bank", str(root), "--content", ids[0][:8], "--style", "neon lights",
                     "--out", str(out), "--steps", "2", "--device", "cpu"]) == 0
    picked = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [(p.get("content"), p.get("style")) for p in picked] == [(ids[0], None), (None, ids[1])]
    assert Image.open(out).size == (64, 64)
    # `export ITEM --bank`: a library item's style LoRA converted to the diffusers format, beside nothing of the
    # library's own (an --out is required)
    from unziplora.export import lora_format

    assert cli.main(["export", ids[1][:8], "--bank", str(root), "--format", "diffusers", "--kind", "style",
                     "--out", str(tmp_path / "exported")]) == 0
    assert [p.name for p in (tmp_path / "exported").iterdir()] == ["style_lora_diffusers.safetensors"]
    assert lora_format(tmp_path / "exported" / "style_lora_diffusers.safetensors") == "diffusers"
    with pytest.raises(SystemExit, match="give --out"):
        cli.main(["export", ids[1][:8], "--bank", str(root), "--format", "diffusers"])
    assert not list((root / layout.ITEMS / ids[1]).glob("*_diffusers.safetensors"))


def test_s3_library(tmp_path, minilm):
    from pipeline_fixtures import local_s3

    with local_s3() as s3:
        options = s3.storage_options
        root = f"s3://{s3.bucket}/lib"
        rows = write_library(root, make_items([WATERCOLOR[0], OTHERS[0], OTHERS[3]]), options)
        publish(root, rows, "run-a", options)
        build_bank(root, storage_options=options, text_embedder=minilm, image_embedders=["tiny"])
        assert any(k.startswith("lib/bank/embeddings/all-MiniLM-L6-v2/part-") for k in s3.objects("lib/bank"))
        rows += write_library(root, make_items([WATERCOLOR[1]], start=3), options)
        publish(root, rows, "run-b", options)
        assert build_bank(root, storage_options=options, text_embedder=minilm,
                          image_embedders=["tiny"])["added"] == {"all-MiniLM-L6-v2": 1, "tiny-style-0": 1}

        bank = Bank(root, options)
        hits = bank.search("soft watercolor with ink outlines", k=2, text_embedder=minilm)
        assert {h["style"] for h in hits} == set(WATERCOLOR)
        assert hits[0]["style_lora_uri"].startswith(f"s3://bucket/lib/{layout.ITEMS}/")
        assert bank.search(image=f"s3://{s3.bucket}/lib-input/img001.png", k=1)[0]["style"] == OTHERS[0]
        folder = bank.fit_dir(hits[0], tmp_path / "cache")  # downloaded, sha256-checked
        assert sorted(p.name for p in folder.iterdir()) == sorted(FIT_FILES)
        page = write_gallery(hits, tmp_path / "gallery", storage_options=options)
        assert len(list((tmp_path / "gallery" / "thumbs").iterdir())) == 3  # 2 sources + 1 style preview
        assert f"s3://bucket/lib/{layout.ITEMS}/" in page.read_text()



def test_gallery_shows_scores_and_links(library, tmp_path):
    """Each card: the fit's quality scores, a link to its model card and (on an MLflow server) to its run;
    never a link a browser would run (javascript:) or could not open (s3://)."""
    bank = Bank(library)
    hits = bank.search(k=None)
    hits[0]["files"][CARD] = {"uri": "/lib/items/x/README.md"}
    hits[0]["mlflow_run_id"] = "abc123"
    hits[1]["files"][CARD] = {"uri": "javascript:alert(1)"}
    hits[2]["files"][CARD] = {"uri": "s3://bucket/items/y/README.md"}
    registry = {"tracking_uri": "http://mlflow.example:5000/", "experiment_id": "7"}
    page = write_gallery(hits[:3], tmp_path / "g", registry=registry).read_text()
    cards = page.split('<article class="card"')[1:]
    assert '<a href="file:///lib/items/x/README.md">model card</a>' in cards[0]
    assert '<a href="http://mlflow.example:5000/#/experiments/7/runs/abc123">MLflow run</a>' in cards[0]
    assert "javascript:" not in page and "<a" not in cards[1]
    assert "s3://bucket/items/y/README.md" not in cards[2]
    scored = hits[0]
    assert f"style {scored['score_style']:.2f}" in cards[0] and "content 0.90" in cards[0]


def test_gallery_in_headless_chromium(library, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:  # CI sets UNZIPLORA_REQUIRE_BROWSER=1: there a missing browser fails the test
        assert not os.environ.get("UNZIPLORA_REQUIRE_BROWSER"), "chromium is missing (scripts/setup.sh as root)"
        pytest.skip("Debian `chromium` is not installed (scripts/setup.sh installs it when run as root)")
    from playwright.sync_api import sync_playwright
    bank = Bank(library)
    hits = bank.search(k=None)
    page_path = write_gallery(hits, tmp_path / "gallery", title="test bank")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 5000})  # every lazy thumbnail in view
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(page_path.as_uri())
            assert page.title() == "test bank"  # the injected script would have set "pwned"
            assert not page.evaluate("document.querySelectorAll('main script').length")
            cards = page.locator(".card")
            assert cards.count() == len(hits) == 10
            assert page.locator("#count").inner_text() == "10 of 10"
            injected = page.locator(".card", has_text="pwned")
            assert injected.locator(".style").inner_text() == INJECTED  # shown as text, exactly
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")
            loaded = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
            assert loaded == len(hits) + sum(1 for h in hits if h["previews"])  # sources + style previews
            page.fill("#filter", "watercolor ink")
            visible = [c.get_attribute("data-item") for c in cards.all() if c.is_visible()]
            assert sorted(visible) == sorted(h["item_id"] for h in hits if h["style"] in WATERCOLOR)
            assert page.locator("#count").inner_text() == "2 of 10"
            page.fill("#filter", "")
            assert sum(c.is_visible() for c in cards.all()) == 10
            assert not errors, errors
        finally:
            browser.close()
