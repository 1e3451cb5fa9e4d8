"""The pages' measured numbers and figures against the committed result files (benchmarks/results.py):
- every number a page ties to a result file (`2.19<!-- multifit.json: tiny.speedup.4 -->x`) is that file's
  value, rounded as the page writes it;
- every result file says what made it (benchmark, command, date, machine, provenance);
- every figure benchmarks/figures.py draws was drawn from the files as they are now (its `Source` chunk), and
  drawing it again works.
"""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from benchmarks import figures, results

PAGES = [results.REPO / "README.md", *sorted((results.REPO / "docs").glob("*.md"))]
ANY_MARKER = re.compile(r"<!-- [\w./-]+\.json: [^<>]+? -->")


def test_every_tied_number_is_its_result_file_s_value():
    wrong, seen = [], 0
    for page in PAGES:
        for written, name, key, line in results.markers(page.read_text()):
            seen += 1
            where = f"{page.relative_to(results.REPO)}:{line}: {written} <- {name}: {key}"
            try:
                value = results.lookup(results.load(name), key)
            except (OSError, KeyError, IndexError, ValueError, TypeError) as exc:
                wrong.append(f"{where}: cannot be read ({type(exc).__name__}: {exc})")
                continue
            if not results.agrees(written, value):
                wrong.append(f"{where}: the file says {value}")
    assert seen >= 20, f"only {seen} tied numbers found: did the marker syntax change?"
    assert not wrong, "pages and their result files disagree:\n" + "\n".join(wrong)


def test_a_marker_without_its_number_is_no_marker():
    """A marker the checker would skip (no number right before it) is a mistake on the page."""
    stray = []
    for page in PAGES:
        text = page.read_text()
        every, tied = len(ANY_MARKER.findall(text)), len(list(results.markers(text)))
        if every != tied:
            stray.append(f"{page.name}: {every} markers, {tied} of them right after a number")
    assert not stray, stray


@pytest.mark.parametrize("name", sorted(path.name for path in results.RESULTS.glob("*.json")))
def test_every_result_file_says_what_made_it(name):
    record = json.loads((results.RESULTS / name).read_text())
    assert set(results.FIELDS) <= set(record), f"{name} lacks {set(results.FIELDS) - set(record)}"
    assert all(record[field] for field in results.FIELDS), record


def test_the_marker_rules():
    text = ("a 2.19<!-- f.json: a.b -->x, **0.931**<!-- f.json: c -->; 1,473<!-- f.json: [k=v,n=2].x*1000 --> ms")
    assert [m[:3] for m in results.markers(text)] == [
        ("2.19", "f.json", "a.b"), ("0.931", "f.json", "c"), ("1,473", "f.json", "[k=v,n=2].x*1000")]
    data = {"a": {"b": 2.186}, "rows": [{"k": "v", "n": 1, "x": 1}, {"k": "v", "n": 2, "x": 1.4731}]}
    assert results.lookup(data, "a.b") == 2.186
    assert results.lookup(data, "rows.[k=v,n=2].x*1000") == pytest.approx(1473.1)
    assert results.lookup(data, "rows.1.n") == 2
    assert results.lookup({"now": {"a.b": 5}}, 'now["a.b"]') == 5
    with pytest.raises(KeyError):
        results.lookup(data, "rows.[k=v].x")  # two rows match: ambiguous
    assert results.agrees("2.19", 2.186) and results.agrees("2.2", 2.186) and not results.agrees("2.18", 2.186)
    assert results.agrees("1,473", 1473.1) and not results.agrees("14", 14.6)
    # a sign is the number's after a space or "(", never a range's dash
    text = "+6<!-- f.json: d --> (-1<!-- f.json: lo --> to +12<!-- f.json: hi -->), 39-74<!-- f.json: r -->"
    assert [m[0] for m in results.markers(text)] == ["+6", "-1", "+12", "74"]
    assert results.agrees("-1", -0.8) and not results.agrees("1", -0.8)


@pytest.mark.parametrize("name", sorted(figures.FIGURES))
def test_every_figure_is_drawn_from_the_result_files_as_they_are(name, tmp_path):
    committed = Image.open(figures.IMG / name)
    assert committed.text.get("Source") == figures.source(name), (
        f"docs/img/{name} was not drawn from the result files as they are now: "
        f"run `python -m benchmarks.figures {name.removesuffix('.png')}`")
    drawn = Image.open(figures.draw(name, tmp_path))
    assert drawn.size == committed.size and drawn.text["Source"] == figures.source(name)


def test_every_picture_is_drawn_from_a_result_file_or_says_why_not():
    pictures = {path.name for path in figures.IMG.glob("*.png")}
    assert pictures == set(figures.FIGURES) | set(figures.OTHERS), (
        "a picture under docs/img that benchmarks/figures.py neither draws nor lists in OTHERS (or one listed "
        f"that is gone): {sorted(pictures ^ (set(figures.FIGURES) | set(figures.OTHERS)))}")
