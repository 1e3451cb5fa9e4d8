"""Fit settings: one dataclass, from CLI flags or a YAML/TOML file, written next to every fit's output."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import yaml

from .errors import InputError

PRECISIONS = ("fp32", "fp16", "bf16")
# SPEC's learning rate is sized for SDXL; a LoRA on the toy world's 4 M-parameter UNet needs a larger step
# (measured on examples/sample_set/dotted_circle.png, 600 steps, rank 64: mean MSE of the last 50 steps
# 0.033 at 1e-3, 0.047 at 5e-5; the README's benchmark uses 1e-3)
DEFAULT_LR = 5e-5
MODEL_LR = {"toy": 1e-3}
INITS = ("reference", "zeros")


class Prompts(NamedTuple):
    combined: str  # drives the frozen base weights
    content: str  # drives the content LoRA
    style: str  # drives the style LoRA


@dataclass
class FitConfig:
    content: str  # content trigger, e.g. "sks dog"
    style: str  # style description, e.g. "watercolor painting"
    class_word: str | None = None  # default: the trigger without its first (rare) word
    prompt: str | None = None  # combined prompt; default "A {content} in {style} style"
    content_prompt: str | None = None  # default "A {content}"
    style_prompt: str | None = None  # default "A {class_word} in {style} style"
    base_model: str = "tiny"  # a preset (tiny, sdxl-random), a diffusers SDXL directory or a hub id
    steps: int = 600
    rank: int = 64
    resolution: int | None = None  # default: the base model's own (1024 for SDXL, 64 for tiny)
    seed: int = 0
    lr: float | None = None  # both LoRAs; default: the base model's (MODEL_LR), else DEFAULT_LR
    merger_lr: float = 5e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    column_ratio: float = 0.1  # fraction of columns added to a sparse mask at each recalibration
    recalibrations: int = 3
    ortho_lambda: float = 0.5
    init: str = "reference"
    role_table: str | None = None  # default: the base model's table
    precision: str = "bf16"  # UNet dtype on an accelerator; always fp32 on CPU
    save_precision: str = "fp16"  # dtype of the saved LoRA files
    device: str = "auto"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.lr is None:  # resolved here, so saved settings and item ids always hold the number
            self.lr = MODEL_LR.get(self.base_model, DEFAULT_LR)
        self.validate()

    def validate(self) -> None:
        for name in ("content", "style"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise InputError(f"the {name} text is empty: give e.g. "
                                 "--content 'sks dog' --style 'watercolor painting'")
        positive = ("steps", "rank", "recalibrations", "lr", "merger_lr")
        for name in positive:
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.recalibrations > self.steps:
            raise InputError(f"recalibrations ({self.recalibrations}) cannot exceed steps ({self.steps})")
        if not 0 < self.column_ratio * self.recalibrations <= 1:
            raise InputError("column_ratio x recalibrations must lie in (0, 1]")
        if self.resolution is not None and self.resolution < 8:
            raise InputError(f"resolution {self.resolution} is too small")
        for name, allowed in (("precision", PRECISIONS), ("save_precision", PRECISIONS), ("init", INITS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def resolved_class_word(self) -> str:
        if self.class_word:
            return self.class_word.strip()
        words = self.content.split()
        return " ".join(words[1:]) if len(words) > 1 else words[0]

    def prompts(self) -> Prompts:
        content, style = self.content.strip(), self.style.strip()
        return Prompts(
            combined=self.prompt or f"A {content} in {style} style",
            content=self.content_prompt or f"A {content}",
            style=self.style_prompt or f"A {self.resolved_class_word} in {style} style",
        )

    @property
    def calibration_steps(self) -> list[int]:
        """Steps taken with masks off whose gradients rescore the columns: 0, period, 2 * period, ..."""
        period = self.steps // self.recalibrations
        return [i * period for i in range(self.recalibrations)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "FitConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict) -> "FitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "FitConfig":
        """Read YAML (.yaml/.yml) or TOML (.toml); keyword overrides (e.g. CLI flags) win."""
        return cls.from_dict({**read_settings_file(path), **overrides})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def read_settings_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "YAML"
        raise InputError(f"config file {path} is not valid {kind}: {exc}") from exc
    if not isinstance(values, dict):
        raise InputError(f"config file {path} must hold a mapping of settings")
    return values
