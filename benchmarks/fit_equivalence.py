"""Same fits, same numbers: short tiny-model fits (fixed seeds) whose per-step losses and final tensors are saved
once and compared later, to show that a change of the training code (issue 33: per-kind factors, per-LoRA
learning rates as optimizer parameter groups; the retired experiments taken out) leaves training as it was.

    .venv/bin/python benchmarks/fit_equivalence.py save BEFORE.pt      # on the code before the change
    .venv/bin/python benchmarks/fit_equivalence.py compare BEFORE.pt   # on the code after it

Cases: the defaults; other rates and loss weights; and three fits trained together (`fit_many`). Prints per case
the largest loss and tensor differences, and the peak RSS of the process.

A mask is a discrete choice (top-k of counts of |dW * G| > 1e-5), so a fit can sit on a knife edge where float
rounding alone picks another column (a fit with steps that trained the style LoRA alone was one, before issue
33: that code flipped the column too when its style lr moved by one part in 1e7). The cases here
are not on such an edge, so they must agree to float rounding, masks exactly.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from unziplora import FitConfig, fit, fit_many
from unziplora.models import load_base_model

SAMPLES = Path(__file__).resolve().parent.parent / "examples" / "sample_set"
IMAGES = [SAMPLES / "striped_star.png", SAMPLES / "dotted_circle.png", SAMPLES / "striped_square.png"]


def _config(n: int, **changes) -> FitConfig:
    kinds = [("sks star", "striped pattern"), ("sks circle", "dotted pattern"), ("sks square", "striped pattern")]
    content, style = kinds[n]
    return FitConfig(**{"content": content, "style": style, "base_model": "tiny", "steps": 8, "rank": 4,
                        "seed": 10 + n, "save_precision": "fp32"} | changes)


CASES = {
    "defaults": lambda: [_config(0)],
    "lr+ortho+mergers": lambda: [_config(1, lr=3e-4, ortho_lambda=1.0, merger_lr=1e-2)],
    "fit_many_x3": lambda: [_config(0), _config(1, lr=3e-4, ortho_lambda=1.0, merger_lr=1e-2),
                            _config(2, steps=6, lr=2.5e-4)],
}


def run() -> dict:
    torch.set_num_threads(1)
    base = load_base_model("tiny", device="cpu")
    out = {}
    for name, configs in CASES.items():
        configs = configs()
        if len(configs) == 1:
            results = [fit(IMAGES[0], configs[0], base=base, progress=False)]
        else:
            results = fit_many(IMAGES[:len(configs)], configs, base=base, progress=False)
        out[name] = [{"losses": [h["loss"] for h in r.history], "tensors": r.tensors} for r in results]
    return out


def compare(before: dict, after: dict) -> bool:
    same = True
    for name, fits in before.items():
        for k, (b, a) in enumerate(zip(fits, after[name])):
            loss = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(b["losses"], a["losses"]))
            worst, bitwise = 0.0, True
            for group, tensors in b["tensors"].items():
                for key, value in tensors.items():
                    other = a["tensors"][group][key]
                    bitwise &= torch.equal(value, other)
                    worst = max(worst, float((value - other).abs().max()) / max(float(value.abs().max()), 1e-12))
            masks_equal = all(torch.equal(v, a["tensors"]["masks"][key]) for key, v in b["tensors"]["masks"].items())
            ok = len(b["losses"]) == len(a["losses"]) and loss < 1e-4 and worst < 1e-4 and masks_equal
            same &= ok
            print(f"{name}[{k}]: steps {len(a['losses'])}, max rel loss diff {loss:.2e}, max rel tensor diff "
                  f"{worst:.2e}, bitwise {bitwise}, masks equal {masks_equal}, {'OK' if ok else 'DIFFERENT'}")
    return same


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    numbers = run()
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if mode == "save":
        torch.save(numbers, path)
        for name, fits in numbers.items():
            print(name, [f"{f['losses'][-1]:.6f}" for f in fits])
    else:
        sys.exit(0 if compare(torch.load(path), numbers) else 1)
