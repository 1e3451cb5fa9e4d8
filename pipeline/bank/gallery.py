"""A static HTML gallery of bank hits: one index.html plus a thumbs/ folder, opened from disk with no server.

Every manifest string goes through html.escape (text and attributes), so a style description holding
`<script>` is shown as text. A Content-Security-Policy allows only the page's own script (by its hash),
so even a missed escape could not run injected code.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

from unziplora import fit_files

from ..store.storage import open_url

THUMB = 256

SCRIPT = """
const box = document.getElementById("filter");
const cards = Array.from(document.querySelectorAll(".card"));
const count = document.getElementById("count");
function applyFilter() {
  const words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const card of cards) {
    const text = card.dataset.search;
    card.hidden = !words.every(w => text.includes(w));
    if (!card.hidden) shown++;
  }
  count.textContent = shown + " of " + cards.length;
}
box.addEventListener("input", applyFilter);
applyFilter();
"""

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1rem; background: #fafafa; }
header { display: flex; gap: 1rem; align-items: center; position: sticky; top: 0; background: #fafafa;
         padding: .5rem 0; }
#filter { flex: 1; font-size: 1rem; padding: .4rem; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1rem; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: .6rem; overflow-wrap: anywhere; }
.card[hidden] { display: none; }
.images { display: flex; gap: .3rem; }
.images figure { margin: 0; flex: 0 1 33%; text-align: center; font-size: .75rem; color: #666; }
.images img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #eee; }
.missing { display: flex; align-items: center; justify-content: center; aspect-ratio: 1; background: #eee; }
h2 { font-size: 1rem; margin: .4rem 0 .2rem; }
.style { margin: 0 0 .4rem; font-style: italic; }
dl { display: grid; grid-template-columns: auto 1fr; gap: .1rem .5rem; margin: 0; font-size: .8rem; }
dt { color: #666; }
dd { margin: 0; }
"""


def write_gallery(hits: list[dict], out_dir: str | Path, *, title: str = "unziplora style bank",
                  storage_options: dict | None = None, threads: int = 8, registry: dict | None = None) -> Path:
    """Write out_dir/index.html and out_dir/thumbs/ for these hits (from Bank.search); returns the page.
    `registry`: the library's registry.json (Bank.registry), for links to each fit's MLflow run."""
    out = Path(out_dir)
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    wanted = {}  # uri -> thumbnail file name; each image read once however many hits show it
    for hit in hits:
        for uri in _images(hit).values():
            wanted.setdefault(uri, hashlib.sha1(uri.encode()).hexdigest()[:20] + ".jpg")
    with ThreadPoolExecutor(threads) as pool:
        made = dict(zip(wanted, pool.map(lambda u: _thumbnail(u, out / "thumbs" / wanted[u], storage_options),
                                         wanted)))
    cards = "\n".join(_card(hit, {label: f"thumbs/{wanted[uri]}" if made[uri] else None
                                  for label, uri in _images(hit).items()}, registry or {}) for hit in hits)
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="script-src 'sha256-{script_hash}'; object-src 'none'; base-uri 'none'">
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body><header><h1>{html.escape(title)}</h1>
<input id="filter" type="search" placeholder="filter: words in style, content, prompts, ids" autofocus>
<span id="count"></span></header>
<main>
{cards}
</main>
<script>{SCRIPT}</script></body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _images(hit: dict) -> dict[str, str]:
    """label -> image URI: the source, then the content and style previews when the fit made them."""
    found = {"source": hit.get("source_uri")} if hit.get("source_uri") else {}
    return found | {f"{kind} preview": uri for kind, uri in hit.get("previews", {}).items()}


def _thumbnail(uri: str, target: Path, storage_options) -> bool:
    if target.exists():  # named by the image's URI: a gallery written again into the same folder reuses it
        return True
    try:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(open_url(uri, storage_options))))  # as shot
        image.thumbnail((THUMB * 3, THUMB))  # previews are strips of up to three panels
        image.convert("RGB").save(target, "JPEG", quality=85)
        return True
    except Exception:  # a missing or undecodable image becomes a placeholder, not a broken page
        return False


def _score_text(hit: dict) -> str | None:
    if hit.get("score") is None:
        return None
    parts = hit.get("scores", {})
    detail = " (" + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + ")" if len(parts) > 1 else ""
    return f"{hit['score']:.3f}{detail}"


QUALITY = (("content", "score_content"), ("style", "score_style"), ("content's style leak", "score_content_style_leak"),
           ("style's shape leak", "score_style_shape_leak"), ("split score (quality gate)", "split_score"))


def _quality(hit: dict) -> str | None:
    """The fit's quality scores (pipeline/quality/scoring.py), when it was scored."""
    parts = [f"{label} {hit[key]:.2f}" for label, key in QUALITY if hit.get(key) is not None]
    return ", ".join(parts) or None


def _href(target: str | None) -> str | None:
    """A link a browser opens from a page on disk: http(s) and local files only (never javascript: and the
    like; an s3:// object is shown as text)."""
    if not target:
        return None
    if target.startswith(("http://", "https://", "file://")):
        return target
    return Path(target).as_uri() if target.startswith("/") else None


def _links(hit: dict, registry: dict) -> dict[str, str]:
    """label -> URL: the fit's model card and, on an MLflow server, its run page."""
    out = {}
    card = _href((hit.get("files") or {}).get(fit_files.CARD, {}).get("uri"))
    if card:
        out["model card"] = card
    server, experiment = registry.get("tracking_uri") or "", registry.get("experiment_id")
    if hit.get("mlflow_run_id") and experiment and server.startswith(("http://", "https://")):
        out["MLflow run"] = f"{server.rstrip('/')}/#/experiments/{experiment}/runs/{hit['mlflow_run_id']}"
    return out


def _card(hit: dict, thumbs: dict[str, str | None], registry: dict | None = None) -> str:
    e = html.escape
    figures = "".join(
        f'<figure><img src="{e(src)}" alt="{e(label)}" loading="lazy"><figcaption>{e(label)}</figcaption></figure>'
        if src else f'<figure><div class="missing">no image</div><figcaption>{e(label)}</figcaption></figure>'
        for label, src in thumbs.items())
    fields = {
        "score": _score_text(hit), "quality": _quality(hit), "item": hit.get("item_id"), "status": hit.get("status"),
        "class": hit.get("class_word"),
        "combined prompt": hit.get("prompt_combined"), "content prompt": hit.get("prompt_content"),
        "style prompt": hit.get("prompt_style"), "content LoRA": hit.get("content_lora_uri"),
        "style LoRA": hit.get("style_lora_uri"), "registry": " ".join(hit.get("registry", {}).values()) or None,
        "base model": hit.get("base_model"), "run": hit.get("run_id"), "finished": hit.get("finished_at"),
        "source": hit.get("source_uri"),
    }
    rows = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in fields.items() if v not in (None, ""))
    links = " · ".join(f'<a href="{e(url)}">{e(label)}</a>' for label, url in _links(hit, registry or {}).items())
    rows += f"<dt>links</dt><dd>{links}</dd>" if links else ""
    search = " ".join(str(v) for v in [hit.get("content"), hit.get("style"), *fields.values()] if v).lower()
    return (f'<article class="card" data-item="{e(hit.get("item_id") or "")}" data-search="{e(search)}">'
            f'<div class="images">{figures}</div><h2>{e(hit.get("content") or "")}</h2>'
            f'<p class="style">{e(hit.get("style") or "")}</p><dl>{rows}</dl></article>')
