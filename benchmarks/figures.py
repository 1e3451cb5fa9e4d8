"""The docs' benchmark figures, drawn from the committed result files (docs/results/, benchmarks/results.py)
by each benchmark's own plot function:

    .venv/bin/python -m benchmarks.figures            # every figure below
    .venv/bin/python -m benchmarks.figures multifit   # one (by its file name)

Each PNG carries the sha256 of the files it was drawn from (a `Source` text chunk):
`tests/test_doc_results.py` fails when a result file changed and its figure was not drawn again.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from benchmarks import results as result_files

IMG = result_files.REPO / "docs" / "img"


def _multifit(path: Path) -> None:
    from benchmarks import multifit

    multifit.plot([(", 150 steps, 7 rounds", result_files.load("multifit.json")),
                   (", 150 steps, 3 rounds", result_files.load("multifit-sweep.json")),
                   (", 60 steps (stage-5 base)", result_files.load("multifit-toy.json"))], str(path))


def _control_plane(path: Path) -> None:
    from benchmarks import control_plane

    control_plane.plot(result_files.load("control_plane.json"), str(path))


def _registry_scale(path: Path) -> None:
    from benchmarks import registry_scale

    registry_scale.plot(result_files.load("registry_scale.json"), str(path))


def _quality_gate(path: Path) -> None:
    from benchmarks import quality_gate

    quality_gate.plot(result_files.load("quality_gate-candidates.json"), str(path))


def _quality_gate_staged(path: Path) -> None:
    from benchmarks import quality_gate

    quality_gate.plot_staged(result_files.load("quality_gate-staged.json"), str(path))


def _disentangle(image_set: str):
    def draw(path: Path) -> None:
        from benchmarks import disentangle

        saved = result_files.load(f"disentangle-{image_set}.json")
        rows = {saved["methods"][key]: row for key, row in saved["rows"].items()}
        sizes = {"all": saved["settings"]["images"], "reconstructable": len(saved["reconstructable"])}
        disentangle.plot(rows, str(path), saved["title"], sizes)
    return draw


# figure file name -> (the function that draws it, the result files it is drawn from)
FIGURES = {
    "multifit.png": (_multifit, ("multifit.json", "multifit-sweep.json", "multifit-toy.json")),
    "control_plane.png": (_control_plane, ("control_plane.json",)),
    "registry_scale.png": (_registry_scale, ("registry_scale.json",)),
    "quality_gate.png": (_quality_gate, ("quality_gate-candidates.json",)),
    "quality_gate_staged.png": (_quality_gate_staged, ("quality_gate-staged.json",)),
    "disentangle.png": (_disentangle("A"), ("disentangle-A.json",)),
    "disentangle-B.png": (_disentangle("B"), ("disentangle-B.json",)),
}

# the other pictures under docs/img, and why they are not drawn from a result file here
OTHERS = {
    "sample_job.png": "examples/make_figure.py, from the sample job's library (images, not numbers)",
    "mlflow_ui.png": "a screenshot of the MLflow UI on a library (commit e2cc72d)",
    "bank_search.png": "benchmarks/bank_search.py --plot as run on 2026-12-01 (commit d2b4db0): only its 1M "
                       "medians were written down (docs/results/bank_search-plot.json), and its other points "
                       "overlap too much to be read off it; the next run's --json makes it a result file",
}


def source(name: str) -> str:
    """What a figure's `Source` chunk says: the files it is drawn from and their sha256."""
    files = FIGURES[name][1]
    return "python -m benchmarks.figures from " + ", ".join(
        f"{f} (sha256 {hashlib.sha256(result_files.path_of(f).read_bytes()).hexdigest()[:16]})" for f in files)


def draw(name: str, folder: Path = IMG) -> Path:
    """Draw one figure into `folder`, stamped with its source."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(folder) / name
    FIGURES[name][0](path)
    info = PngInfo()
    info.add_text("Source", source(name))
    with Image.open(path) as image:
        image.load()
        image.save(path, pnginfo=info)  # matplotlib's own chunks (its version, a date) are not kept
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"of {', '.join(n.removesuffix('.png') for n in FIGURES)} "
                        "(default: all)")
    args = parser.parse_args(argv)
    for name in [n if n.endswith(".png") else n + ".png" for n in args.names] or list(FIGURES):
        if name not in FIGURES:
            parser.error(f"no figure {name}; figures: {', '.join(FIGURES)}")
        print(draw(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
