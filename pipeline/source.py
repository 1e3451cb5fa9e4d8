"""The job's input: image URLs under any fsspec URL, joined with their prompts from a sidecar table.

Prompt table (CSV or Parquet), one row per image:
  image        path relative to the input folder, a file name, or a full URL      (required)
  content      content trigger, e.g. "sks dog"                                    (required)
  style        style description, e.g. "watercolor painting"                      (required)
  class_word, prompt, content_prompt, style_prompt                                (optional)
  steps, seed, rank, lr, ... : every per-item fit setting (FitConfig's "item" scope), optional overrides
An image without a row gets the job's default prompts when given, else a clear per-item failure; so does a
cell that is not a value of its setting (the error names the column and the value).
Item rows hold only strings ("" for none): Ray Data turns a column of Nones into NaNs.
"""

from __future__ import annotations

import io
import json
import posixpath

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from unziplora.config import parse_value, settings
from unziplora.errors import InputError

from .storage import Store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
PROMPT_FIELDS = tuple(f.name for f in settings("prompt"))
OVERRIDE_FIELDS = settings("item")  # per-image columns that override the job's settings
DEFAULT_TABLES = ("prompts.csv", "prompts.parquet")


def list_images(input_url: str, storage_options: dict | None = None) -> list[str]:
    """Every image file below `input_url`, as URLs, sorted (hidden files skipped)."""
    store = Store(input_url, storage_options)
    if not store.fs.exists(store.root):
        raise InputError(f"input {input_url} does not exist")
    files = store.fs.find(store.root)
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)
              and not any(part.startswith(".") for part in f[len(store.root):].split("/"))]
    return sorted(store.url_prefix + f for f in images)


def read_prompt_table(url: str, storage_options: dict | None = None) -> list[dict]:
    store = Store(url.rsplit("/", 1)[0], storage_options)
    data = store.read_bytes(url.rsplit("/", 1)[1])
    try:
        table = pq.read_table(io.BytesIO(data)) if url.endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
    except Exception as exc:
        raise InputError(f"cannot read prompt table {url}: {exc}") from exc
    rows = table.to_pylist()
    missing = {"image", "content", "style"} - set(table.column_names)
    if missing:
        raise InputError(f"prompt table {url} lacks the column(s) {sorted(missing)}")
    per_job = sorted({f.name for f in settings("worker", "local")} & set(table.column_names))
    if per_job:  # every worker loads one base model: these cannot differ between images
        raise InputError(f"prompt table {url} has the column(s) {per_job}, which are set for the whole job "
                         f"(flags of `decompose`), not per image")
    return rows


def find_prompt_table(input_url: str, storage_options: dict | None = None) -> str | None:
    store = Store(input_url, storage_options)
    for name in DEFAULT_TABLES:
        if store.exists(name):
            return store.url(name)
    return None


def build_items(input_url: str, prompts_url: str | None = None, *, default_content: str | None = None,
                default_style: str | None = None, storage_options: dict | None = None) -> list[dict]:
    """One small row per input image: its URL, prompts and overrides, or why it has none."""
    images = list_images(input_url, storage_options)
    prompts_url = prompts_url or find_prompt_table(input_url, storage_options)
    table = read_prompt_table(prompts_url, storage_options) if prompts_url else []
    root = Store(input_url, storage_options)
    root_url = root.url()
    by_key: dict[str, dict] = {}
    names: dict[str, list[dict]] = {}
    for row in table:
        key = str(row["image"])
        by_key[key] = row
        names.setdefault(posixpath.basename(key), []).append(row)
    items = []
    for url in images:
        relative = url[len(root_url):].lstrip("/")
        row = by_key.get(url) or by_key.get(relative)
        if row is None and len(names.get(posixpath.basename(url), [])) == 1:
            row = names[posixpath.basename(url)][0]
        item = {"source_uri": url, "prompt_error": "", "overrides": "{}"}
        if row is not None:
            item |= {f: _text(row.get(f)) for f in PROMPT_FIELDS}
            try:
                overrides = {f.name: parse_value(f, row.get(f.name)) for f in OVERRIDE_FIELDS}
                item["overrides"] = json.dumps({k: v for k, v in overrides.items() if v is not None})
            except InputError as exc:  # one bad cell fails its own image, not the job
                item["prompt_error"] = f"prompt table {prompts_url}, row of {row['image']}: column {exc}"
        elif default_content and default_style:
            item |= {f: "" for f in PROMPT_FIELDS} | {"content": default_content, "style": default_style}
        else:
            item |= {f: "" for f in PROMPT_FIELDS}
            item["prompt_error"] = (f"no prompt row for {relative} in "
                                    f"{prompts_url or 'any prompt table (none found)'}; add a row or pass "
                                    "--default-content and --default-style")
        items.append(item)
    return items


def _text(value) -> str:
    return "" if value is None else str(value).strip()
