"""The `unziplora` command: the single-image commands of unziplora.cli plus the dataset-scale ones."""

from __future__ import annotations

import argparse
import sys

from unziplora import cli as single_image

from . import bank, decompose, forget, registry, repair, rescore, ui


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unziplora", description="Decompose stylized images into content "
                                     "and style LoRAs for SDXL (UnZipLoRA), one image or a whole collection.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    single_image.add_commands(sub)
    d = sub.add_parser("decompose", help="a folder or bucket of images -> a LoRA library (Ray)")
    decompose.add_arguments(d)
    d.set_defaults(run=decompose.run)
    registry.add_commands(sub)  # `registry search|get|sync`: LoRAs in the MLflow model registry
    ui.add_commands(sub)  # `ui LIBRARY`: the MLflow UI on a library's store
    bank.add_commands(sub)  # `bank ...`, and `generate --content/--style` resolved through a bank
    forget.add_commands(sub)  # `forget`: remove sources from a library's manifest
    repair.add_commands(sub)  # `repair`: rebuild a manifest part that cannot be read
    rescore.add_commands(sub)  # `rescore`: today's previews and scores for a library's fits, no fitting
    return parser


def main(argv: list[str] | None = None) -> int:
    return single_image.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
