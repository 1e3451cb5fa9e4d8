"""The job's input: image URLs under any fsspec URL, joined with their prompts from a sidecar table.

Prompt table (CSV or Parquet), one row per image:
  image        path relative to the input folder, a file name, or a full URL      (required)
  content      content trigger, e.g. "sks dog"                                    (required)
  style        style description, e.g. "watercolor painting"                      (required)
  class_word, prompt, content_prompt, style_prompt                                (optional)
  steps, seed, rank, lr, ... : every per-item fit setting (FitConfig's "item" scope), optional overrides
An image without a row gets the job's default prompts when given, else a clear per-item failure; so does a
cell that is not a value of its setting (the error names the column and the value), a cell that is not valid
UTF-8 text or holds a NUL byte (naming the row and column; cells are decoded, never `str(bytes)`), and an image
that two rows name (which row wins would be a guess). An `image` cell that is not text refuses the table.
Every input is accounted for (`Inputs`): files that are not images by their extension, keys that cannot be
read safely (a `..` segment) and prompt rows that name no image are listed by name in the plan and report.
The job's own library (--output) is never input, wherever it lies: inside the input, its files are skipped.
Each item carries its listing stamp (`source_stat`: size and ETag or mtime), kept in its manifest row: a re-run
reads and hashes only images whose stamp changed (`job.plan_items`).
Item rows hold only strings ("" for none): Ray Data turns a column of Nones into NaNs.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from dataclasses import dataclass, field

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from unziplora.config import RETIRED, parse_value, settings
from unziplora.errors import InputError

from ..store.storage import Store

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
PROMPT_FIELDS = tuple(f.name for f in settings("prompt"))
OVERRIDE_FIELDS = settings("item")  # per-image columns that override the job's settings
DEFAULT_TABLES = ("prompts.csv", "prompts.parquet")


@dataclass
class Inputs:
    items: list[dict]  # one small row per image file: its URL, prompts and overrides, or why it has none
    ignored: list[dict] = field(default_factory=list)  # {"uri", "reason"}: files that are not inputs
    unmatched_rows: list[dict] = field(default_factory=list)  # {"row", "image"}: prompt rows naming no image
    library_files: int = 0  # files of the job's own library (--output inside --input), skipped

    def notes(self, limit: int = 100) -> dict:
        """What the report says of them: counts, and the first `limit` names of each."""
        return {"ignored_files": len(self.ignored), "ignored": self.ignored[:limit],
                "unmatched_prompt_rows": len(self.unmatched_rows), "unmatched": self.unmatched_rows[:limit],
                "library_files_skipped": self.library_files}


def list_files(input_url: str, storage_options: dict | None = None,
               library: str | None = None) -> tuple[dict[str, str], list[dict], int]:
    """({URL: listing stamp} of every image file below `input_url`, in URL order; every other file, with why
    it is no input; how many files of `library` were skipped). Hidden files and folders (a leading dot) are
    skipped without a word; so is the folder of `library` (the job's --output) where it lies inside the input:
    a library's own files (previews, MLflow plots) are never fitted as inputs."""
    store = Store(input_url, storage_options)
    if not store.fs.exists(store.root):
        raise InputError(f"input {input_url} does not exist")
    inside = _library_below(store, library, storage_options)
    if inside == "":
        raise InputError(f"--output {library} is the --input folder itself: the library would be read as input; "
                         "give the library a folder of its own (inside the input is fine: it is skipped)")
    images, ignored, skipped = {}, [], 0
    listing = store.fs.find(store.root, detail=True)
    for path in sorted(listing):
        relative = path[len(store.root):].lstrip("/")
        if inside is not None and (relative + "/").startswith(inside + "/"):
            skipped += 1
            continue
        if any(part.startswith(".") and part not in (".", "..") for part in relative.split("/")):
            continue
        url = store.url_prefix + path
        if any(part in ("", ".", "..") for part in relative.split("/")):
            ignored.append({"uri": url, "reason": "a '.', '..' or empty segment in its key"})
        elif not path.lower().endswith(IMAGE_SUFFIXES):
            if posixpath.basename(path) not in DEFAULT_TABLES:
                suffix = posixpath.splitext(path)[1].lower() or "(none)"
                ignored.append({"uri": url, "reason": f"not an image file by its extension {suffix}; "
                                f"images are {', '.join(IMAGE_SUFFIXES)}"})
        else:
            images[url] = listing_stamp(listing[path])
    return images, ignored, skipped


def _library_below(store: Store, library: str | None, storage_options: dict | None) -> str | None:
    """Where `library` lies below the input `store`, as a path relative to it ("" for the input folder itself),
    or None when it lies elsewhere (another store, another folder). Local paths are compared resolved, so a
    symlink to either one is seen through."""
    if not library:
        return None
    other = Store(library, storage_options)
    if other.protocol != store.protocol:
        return None
    root, target = store.root.rstrip("/"), other.root.rstrip("/")
    if store.url_prefix == "":  # local: compare real paths, but skip the library by its spelling below the input
        root, target = os.path.realpath(root), os.path.realpath(target)
    if target == root:
        return ""
    return target[len(root) + 1:] if target.startswith(root + "/") else None


# What a listing says of a file that changes whenever its bytes do: an object store's ETag (or generation),
# else the modification time. With the size, a re-run trusts the image's recorded hash while its stamp holds.
STAMP_KEYS = ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified", "updated")


def listing_stamp(info: dict) -> str:
    """"size:value" of the first STAMP_KEYS entry; "" when the store lists none (then the file is always read)."""
    for key in STAMP_KEYS:
        if info.get(key) not in (None, ""):
            return f"{info.get('size')}:{key}={info[key]}"
    return ""


def read_prompt_table(url: str, storage_options: dict | None = None) -> list[dict]:
    store = Store(url.rsplit("/", 1)[0], storage_options)
    data = store.read_bytes(url.rsplit("/", 1)[1])
    try:
        table = pq.read_table(io.BytesIO(data)) if url.endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
    except Exception as exc:
        raise InputError(f"cannot read prompt table {url}: {exc}") from exc
    missing = {"image", "content", "style"} - set(table.column_names)
    if missing:
        raise InputError(f"prompt table {url} lacks the column(s) {sorted(missing)}")
    rows = table.to_pylist()
    for n, row in enumerate(rows):  # the image cell says which image a row is for: without it, no row is usable
        try:
            row["image"] = cell_text(row["image"])
        except ValueError as exc:
            raise InputError(f"prompt table {url}, data row {n + 1}, column image: {exc}") from None
    per_job = sorted({f.name for f in settings("worker", "local")} & set(table.column_names))
    if per_job:  # every worker loads one base model: these cannot differ between images
        raise InputError(f"prompt table {url} has the column(s) {per_job}, which are set for the whole job "
                         f"(flags of `decompose`), not per image")
    retired = sorted(set(RETIRED) & set(table.column_names))
    if retired:  # silently ignored, they would fit every image otherwise than its row asks
        raise InputError(f"prompt table {url} has the column(s) {retired}: retired fit settings (experiments "
                         f"measured as no gain, docs/toy-world.md); remove them")
    return rows


def find_prompt_table(input_url: str, storage_options: dict | None = None) -> str | None:
    store = Store(input_url, storage_options)
    for name in DEFAULT_TABLES:
        if store.exists(name):
            return store.url(name)
    return None


def read_inputs(input_url: str, prompts_url: str | None = None, *, default_content: str | None = None,
                default_style: str | None = None, storage_options: dict | None = None,
                library: str | None = None) -> Inputs:
    """The job's inputs: one item per image file, joined with its prompt row; plus what is not an input.
    `library`: the job's --output, whose files are skipped where it lies inside the input."""
    images, ignored, library_files = list_files(input_url, storage_options, library)
    prompts_url = prompts_url or find_prompt_table(input_url, storage_options)
    table = read_prompt_table(prompts_url, storage_options) if prompts_url else []
    root_url = Store(input_url, storage_options).url()
    by_key: dict[str, list[int]] = {}  # the `image` cell -> the numbers of the rows holding it
    by_name: dict[str, list[int]] = {}  # its file name -> the same
    for n, row in enumerate(table):
        key = str(row["image"] or "").strip()
        by_key.setdefault(key, []).append(n)
        by_name.setdefault(posixpath.basename(key), []).append(n)
    used: set[int] = set()
    items = []
    for url in images:
        relative = url[len(root_url):].lstrip("/")
        found = by_key.get(url, []) + by_key.get(relative, [])
        if not found and len(by_name.get(posixpath.basename(url), [])) == 1:  # a bare file name, if unique
            found = by_name[posixpath.basename(url)]
        used.update(found)
        item = {"source_uri": url, "source_stat": images[url], "prompt_error": "", "overrides": "{}"} | \
            {f: "" for f in PROMPT_FIELDS}
        if len(found) > 1:
            item["prompt_error"] = (f"prompt table {prompts_url} has {len(found)} rows for {relative} (data rows "
                                    f"{', '.join(str(n + 1) for n in found)}): keep one")
        elif found:
            item |= _prompt_columns(table[found[0]], prompts_url, found[0] + 1)
        elif default_content and default_style:
            item |= {"content": default_content, "style": default_style}
        else:
            item["prompt_error"] = (f"no prompt row for {relative} in "
                                    f"{prompts_url or 'any prompt table (none found)'}; add a row or pass "
                                    "--default-content and --default-style")
        items.append(item)
    unmatched = [{"row": n + 1, "image": str(row["image"])} for n, row in enumerate(table) if n not in used]
    return Inputs(items, ignored, unmatched, library_files)


def _prompt_columns(row: dict, prompts_url: str, number: int) -> dict:
    """An item's prompts and overrides from its row (`number`: its data row); a cell that is not text or not a
    value of its setting fails the item (naming the row, the column and the value), never the job."""
    item = {}
    try:
        for f in PROMPT_FIELDS:
            value = _decoded(f, row.get(f))
            item[f] = "" if value is None else str(value).strip()  # a number is text too ("content: 5")
        overrides = {f.name: parse_value(f, _decoded(f.name, row.get(f.name))) for f in OVERRIDE_FIELDS}
        item["overrides"] = json.dumps({k: v for k, v in overrides.items() if v is not None})
    except InputError as exc:
        return {f: "" for f in PROMPT_FIELDS} | {
            "prompt_error": f"prompt table {prompts_url}, data row {number} (image {row['image']}): column {exc}"}
    return item


def _decoded(column: str, value):
    try:
        return cell_text(value)
    except ValueError as exc:
        raise InputError(f"{column}: {exc}") from None


def cell_text(value):
    """A prompt-table cell as text: bytes (pyarrow reads a CSV column holding invalid UTF-8 as binary, and a
    Parquet column may be binary) decoded as UTF-8; other values as they are. ValueError for a cell that is not
    valid UTF-8 or that holds a NUL byte: never a `str(bytes)` such as "b'sks a'" as a prompt."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not valid UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start} of "
                             f"{data[:40]!r})") from None
    if isinstance(value, str) and "\0" in value:
        raise ValueError(f"holds a NUL byte ({value[:40]!r})")
    return value
