"""`unziplora bank build|search|gallery`, and `unziplora generate --content ITEM --style QUERY_OR_ITEM --bank LIB`
(the single-image `generate` command, taught to pick its fits from a library's bank)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipeline.run.spec import add_storage_options

CACHE = os.environ.get("UNZIPLORA_CACHE", "~/.cache/unziplora/bank")
SUMMARY = ("score", "item_id", "content", "style")


def add_commands(sub) -> None:
    bank = sub.add_parser("bank", help="style bank of a library: build the index, search it, write a gallery")
    commands = bank.add_subparsers(required=True, metavar="BANK_COMMAND")

    b = commands.add_parser("build", help="index a library's manifest (incremental: only new texts/images)")
    _library(b)
    b.add_argument("--text-embedder", default="minilm", help="text embedder spec (minilm)")
    b.add_argument("--image-embedder", action="append", default=[], metavar="SPEC",
                   help="also embed the source images: clip:/local/clip/dir | tiny | package.module:factory")
    b.set_defaults(run=_build)

    for name, text in (("search", "find items by text, example image and metadata"),
                       ("gallery", "static HTML page of matching items (opens from disk)")):
        p = commands.add_parser(name, help=text)
        _library(p)
        p.add_argument("query", nargs="?", help="text, e.g. 'soft watercolor with ink outlines'")
        p.add_argument("--image", help="an example image (path or URL) to match source images' style")
        p.add_argument("--field", default="style", choices=("style", "content"), help="what the text query matches")
        p.add_argument("--image-embedder", help="default: the one image embedder the bank was built with")
        p.add_argument("--text-embedder", default="minilm")
        p.add_argument("--status", default="ok", help="ok | failed | skipped | any (default ok)")
        p.add_argument("--class-word", help="content class, e.g. dog")
        p.add_argument("--content", help="substring of the content trigger")
        p.add_argument("--base-model")
        p.add_argument("--since", help="finished at or after (ISO date or time)")
        p.add_argument("--until", help="finished at or before (ISO date: that whole day)")
        p.add_argument("--run", dest="job_run", help="job run id (or MLflow run id)")
        p.add_argument("--min-style-score", type=float, help="only fits whose style score (its style LoRA on other "
                       "subjects) is at least this; unscored fits are left out")
        p.add_argument("--min-content-score", type=float, help="only fits whose content score is at least this")
        p.add_argument("--max-leak", type=float, help="only fits whose two leak scores are at most this")
        p.add_argument("--min-split-score", type=float, help="only fits the quality gate scored at least this "
                       "(decompose --candidates); ungated fits are left out")
        p.add_argument("--skip-gate-failures", action="store_true",
                       help="leave out fits that never reached the gate's --min-split-score (ungated fits stay)")
        if name == "search":
            p.add_argument("-k", "--top", type=int, default=10, help="how many results (10)")
            p.add_argument("--json", action="store_true", help="one JSON object per result, every column")
            p.set_defaults(run=_search)
        else:
            p.add_argument("--out", required=True, help="folder for index.html and thumbs/")
            p.add_argument("--limit", type=int, default=1000, help="at most this many items (1000; 0: all)")
            p.set_defaults(run=_gallery)

    _extend_generate(sub.choices["generate"])
    _extend_export(sub.choices["export"])


def _library(p) -> None:
    p.add_argument("library", help="library URL or path (the decompose --output)")
    add_storage_options(p)


def _build(args) -> int:
    from pipeline.bank import build_bank

    summary = build_bank(args.library, storage_options=args.storage_options, text_embedder=args.text_embedder,
                         image_embedders=args.image_embedder)
    print(json.dumps(summary))
    return 0


def _query(args, k):
    from unziplora.config import check_number

    for flag in ("min_style_score", "min_content_score", "max_leak", "min_split_score"):
        check_number("--" + flag.replace("_", "-"), getattr(args, flag), optional=True)
    if hasattr(args, "top"):
        check_number("--top", args.top, integer=True, minimum=1)
    else:
        check_number("--limit", args.limit, integer=True, minimum=0)
    from pipeline.bank import Bank  # NumPy and the embedders: only once the flags are known to be good

    bank = Bank(args.library, args.storage_options)
    filters = dict(status=None if args.status == "any" else args.status.split(","), class_word=args.class_word,
                   content=args.content, base_model=args.base_model, since=args.since, until=args.until,
                   run=args.job_run, min_content_score=args.min_content_score,
                   min_style_score=args.min_style_score, max_leak=args.max_leak,
                   min_split_score=args.min_split_score, skip_gate_failures=args.skip_gate_failures)
    hits = bank.search(args.query, args.image, field=args.field, k=k, text_embedder=args.text_embedder,
                       image_embedder=args.image_embedder, **filters)
    unindexed = bank.unindexed(args.field, args.text_embedder) if args.query else 0
    if unindexed:
        print(f"note: {unindexed} ok rows are not indexed yet; run `unziplora bank build`", file=sys.stderr)
    return bank, hits


def _search(args) -> int:
    _, hits = _query(args, args.top)
    for hit in hits:
        kind = args.field  # the LoRA the query was about
        row = hit if args.json else {k: hit[k] for k in SUMMARY} | {f"{kind}_lora_uri": hit[f"{kind}_lora_uri"],
                                                                     "registry": hit["registry"].get(kind)}
        print(json.dumps(row, default=str))
    return 0


def _gallery(args) -> int:
    from pipeline.bank import write_gallery

    bank, hits = _query(args, args.limit or None)
    title = f"{bank.library_name}: {args.query}" if args.query else bank.library_name
    page = write_gallery(hits, args.out, title=title, storage_options=args.storage_options, registry=bank.registry)
    print(json.dumps({"gallery": str(page), "items": len(hits)}))
    return 0


# ---- generate from the bank


def _extend_generate(g) -> None:
    g.add_argument("--bank", help="library whose bank resolves --content / --style")
    g.add_argument("--content", help="content LoRA: a fit directory, or with --bank an item id (prefix) or a text "
                   "query matched against content classes")
    g.add_argument("--style", help="style LoRA: a fit directory, or with --bank an item id (prefix) or a text query "
                   "('soft watercolor with ink outlines') matched against style descriptions")
    add_storage_options(g, of="--bank")
    g.add_argument("--cache-dir", default=CACHE, help=f"where fits from a remote bank are downloaded ({CACHE})")
    generate = g.get_default("run")
    g.set_defaults(run=lambda args: generate(resolve_fits(args)))


def _extend_export(e) -> None:
    """`unziplora export ITEM --bank LIBRARY`: ITEM an item id (prefix) of the library, fetched like generate's."""
    e.add_argument("--bank", help="library whose item ITEM is (an item id or its prefix)")
    add_storage_options(e, of="--bank")
    e.add_argument("--cache-dir", default=CACHE, help=f"where fits from a remote bank are downloaded ({CACHE})")
    export = e.get_default("run")

    def run(args):
        if args.bank:
            if not args.out:  # never into the library's own item folder
                raise SystemExit("unziplora export: with --bank, give --out FOLDER")
            from pipeline.bank import Bank

            bank = Bank(args.bank, args.storage_options)
            hit = bank.get(args.fit_dir)
            if hit is None:
                raise SystemExit(f"unziplora export: no ok item {args.fit_dir!r} in {args.bank}")
            args.fit_dir = str(bank.fit_dir(hit, args.cache_dir))
        return export(args)
    e.set_defaults(run=run)


def resolve_fits(args):
    """Turn --content/--style into the --content-from/--style-from fit directories `generate` reads."""
    bank = None
    for kind in ("content", "style"):
        ref = getattr(args, kind)
        if not ref:
            continue
        if Path(ref).is_dir():
            setattr(args, f"{kind}_from", ref)
            continue
        if not args.bank:
            from unziplora.errors import InputError

            raise InputError(f"--{kind} {ref!r} is not a fit directory; give --bank LIBRARY "
                             "to look it up in a library")
        if bank is None:
            from pipeline.bank import Bank

            bank = Bank(args.bank, args.storage_options)
        hit = bank.resolve(ref, field=kind)
        setattr(args, f"{kind}_from", str(bank.fit_dir(hit, args.cache_dir)))
        print(json.dumps({kind: hit["item_id"], "score": hit["score"], "text": hit[kind],
                          "registry": hit["registry"].get(kind)}), file=sys.stderr)
    return args
