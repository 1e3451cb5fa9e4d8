"""Two runs of benchmarks/scorer_agreement.py on the same candidates, paired image by image.

    python benchmarks/scorer_agreement_paired.py FIRST.json SECOND.json [--json OUT.json]

For a setting of the gate that a run fixes (`--gate-images 2` against `4`, say): per scorer both runs measured,
SECOND minus FIRST image by image, with 95 % bootstrap intervals over images, of its Spearman within images
against the truth and against the judges, and of its choice's gain over a random candidate. The runs must have
judged the same candidates (the same images, candidates and truth).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scorer_agreement import paired_line, paired_scorers  # noqa: E402  (beside this file)


def load(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    return data.get("results", data)  # a committed result file, or a bare report


def compare(first: dict, second: dict) -> dict:
    same = ("images", "candidates", "oracle_gain", "random_gain")  # the truth's own figures: the same candidates
    differ = [f"{key} {first[key]} vs {second[key]}" for key in same if first[key] != second[key]]
    if differ:
        raise SystemExit("the two runs did not judge the same candidates: " + ", ".join(differ))
    return {name: paired_scorers(first["scorers"][name], second["scorers"][name])
            for name in first["scorers"] if name in second["scorers"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--json", help="also write the figures as a result file")
    a = p.parse_args(argv)
    report = {"first": a.first, "second": a.second, "scorers": compare(load(a.first), load(a.second))}
    print(f"second ({a.second}) minus first ({a.first}), image by image (95 %):")
    for name, d in report["scorers"].items():
        print(f"{name}: {paired_line(d)}")
    if a.json:
        import results as result_files  # beside this file

        result_files.save(a.json, report)
    return report


if __name__ == "__main__":
    main()
