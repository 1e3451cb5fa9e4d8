"""Fit settings: one dataclass, from CLI flags or a YAML/TOML file, written next to every fit's output."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tomllib
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from .errors import InputError
from .locate import HUB_ID_PATTERN

PRECISIONS = ("fp32", "fp16", "bf16")
# the LoRA files' formats (unziplora.export; an output choice, not a fit setting: item ids do not hold it).
# kohya is the one file diffusers, ComfyUI and A1111 all load: a LoRA pair at SDXL rank 64 in fp16 is about
# 370 MB, and a second copy of the same tensors in another key layout is written only when asked for
LORA_FORMATS = ("kohya", "diffusers")
DEFAULT_FORMATS = ("kohya",)
# SPEC's learning rate is sized for SDXL; a LoRA on the toy world's 4 M-parameter UNet needs a larger step
# (measured on examples/sample_set/dotted_circle.png, 600 steps, rank 64: mean MSE of the last 50 steps
# 0.033 at 1e-3, 0.047 at 5e-5; the disentanglement benchmark, docs/toy-world.md, uses 1e-3)
DEFAULT_LR = 5e-5
MODEL_LR = {"toy": 1e-3}
INITS = ("reference", "zeros")
# settings that once were fit settings: experiments measured as no gain and taken out of the fit code
# (issue 33; docs/toy-world.md keeps their measurements and the commit that can run them again), each with
# the value at which it did nothing. A saved fit or settings file that holds one at that value reads as before;
# settings files and flags that ask for anything else are refused (a saved fit still loads: its record keeps it)
RETIRED = {"column_picks": "cumulative", "style_lr": None, "content_alone": 0.0, "style_alone": 0.0,
           "shared_columns": "mergers", "style_stage": 0.0, "calibration_window": 1, "down_ortho": 0.0}
RETIRED_AT = "69d22e6"  # the last commit whose fit code runs them


class Prompts(NamedTuple):
    combined: str  # drives the frozen base weights
    content: str  # drives the content LoRA
    style: str  # drives the style LoRA


def setting(help: str, default=MISSING, *, scope: str = "item", choices: tuple | None = None):
    """One fit setting. `scope` says where it can be set (SCOPES); CLI flags, job flags and prompt-table
    columns are all derived from these declarations."""
    assert scope in SCOPES, scope
    return field(default=default, metadata={"help": help, "scope": scope, "choices": choices})


# where a setting can be given: every scope is a `unziplora fit` flag and a --config key; beyond that
SCOPES = {
    "prompt": "per image: a prompt-table column",
    "item": "per image (a prompt-table column) or for the whole job (a `decompose` flag)",
    "worker": "for the whole job only: each fit worker loads one base model with it",
    "local": "`unziplora fit` only (a job's workers get their device from Ray)",
}


@dataclass
class FitConfig:
    content: str = setting("content trigger, e.g. 'sks dog'", scope="prompt")
    style: str = setting("style description, e.g. 'watercolor painting'", scope="prompt")
    class_word: str | None = setting("class word of the style prompt (default: the trigger without its first "
                                     "word)", None, scope="prompt")
    prompt: str | None = setting("combined prompt (default 'A {content} in {style} style')", None, scope="prompt")
    content_prompt: str | None = setting("content prompt (default 'A {content}')", None, scope="prompt")
    style_prompt: str | None = setting("style prompt (default 'A {class word} in {style} style')", None,
                                       scope="prompt")
    base_model: str = setting("tiny | sdxl-random | toy | a diffusers SDXL folder | a single-file .safetensors "
                              "checkpoint | a hub id org/name[@revision]", "tiny", scope="worker")
    revision: str | None = setting("hub revision: branch, tag or commit (default: main); resolved to the "
                                   "commit", None, scope="worker")
    variant: str | None = setting("weights variant of a diffusers folder or hub model, e.g. fp16", None,
                                  scope="worker")
    base_config: str | None = setting("diffusers config folder for a single-file checkpoint (default: "
                                      "SDXL-base 1.0's, bundled)", None, scope="worker")
    steps: int = setting("training steps", 600)
    rank: int = setting("LoRA rank", 64)
    resolution: int | None = setting("training resolution (default: the base model's, 1024 for SDXL)", None)
    seed: int = setting("random seed", 0)
    lr: float | None = setting("learning rate of both LoRAs (default: 5e-5, SPEC's for SDXL; 1e-3 for toy)", None)
    merger_lr: float = setting("learning rate of the column mergers", 5e-3)
    weight_decay: float = setting("AdamW weight decay of the LoRAs", 1e-4)
    grad_clip: float = setting("gradient-norm clip", 1.0)
    column_ratio: float = setting("fraction of columns added to a sparse mask at each recalibration", 0.1)
    recalibrations: int = setting("number of mask recalibrations", 3)
    ortho_lambda: float = setting("weight of the orthogonality loss", 0.5)
    init: str = setting("LoRA init", "reference", choices=INITS)
    role_table: str | None = setting("block-role table (default: the base model's)", None)
    precision: str = setting("UNet dtype on an accelerator (always fp32 on CPU)", "bf16", scope="worker",
                             choices=PRECISIONS)
    save_precision: str = setting("dtype of the saved LoRA files", "fp16", choices=PRECISIONS)
    device: str = setting("auto | cpu | cuda | cuda:N", "auto", scope="local")
    gradient_checkpointing: bool = setting("recompute activations in the backward pass: less memory, more "
                                           "time (SDXL at 1024 px in 24 GB)", False, scope="worker")
    compile: bool = setting("torch.compile the UNet, once per loaded base model (measured slower on CPU)", False,
                            scope="worker")

    def __post_init__(self):
        self._split_revision()
        if self.lr is None:  # resolved here, so saved settings and item ids always hold the number
            self.lr = MODEL_LR.get(self.base_model, DEFAULT_LR)
        self.validate()

    def _split_revision(self) -> None:
        """`org/name@rev` -> base_model `org/name`, revision `rev` (a local path keeps its "@")."""
        if not isinstance(self.base_model, str) or not HUB_ID_AT_REVISION.match(self.base_model) or \
                Path(self.base_model).expanduser().exists():
            return
        name, revision = self.base_model.split("@", 1)
        if self.revision not in (None, revision):
            raise InputError(f"base_model {self.base_model!r} names revision {revision!r} but revision is "
                             f"{self.revision!r}: give one")
        self.base_model, self.revision = name, revision

    def validate(self) -> None:
        for f in _fields(type(self)):
            check_type(f, getattr(self, f.name))
            if value_type(f)[0] is float and isinstance(getattr(self, f.name), int):
                setattr(self, f.name, float(getattr(self, f.name)))  # lr 1 and 1.0: one setting, one hash
        for name in ("content", "style"):
            if not getattr(self, name).strip():
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
        """The recalibrations: steps taken with masks off whose gradients score the columns, then pick
        (0, period, 2 * period, ...)."""
        period = self.steps // self.recalibrations
        return [i * period for i in range(self.recalibrations)]

    def to_dict(self) -> dict:
        # every value is a str, number, bool or None (check_type): a shallow copy is a full one, and fast
        return {f.name: getattr(self, f.name) for f in _fields(type(self))}

    def replace(self, **changes) -> "FitConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict, *, saved: bool = False) -> "FitConfig":
        """Settings from a mapping (a settings file, a prompt-table row, a job). `saved`: a fit's own record,
        which may hold retired settings at any value (RETIRED); elsewhere only at the value that did nothing."""
        values = without_retired(values, saved)
        known = {f.name for f in _fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown settings {unknown}; known: {sorted(known)}")
        required = [f.name for f in _fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if values.get(name) is None]
        if missing:  # e.g. an empty content cell in a prompt table
            raise InputError(f"the {' and '.join(missing)} text is empty: give e.g. "
                             "--content 'sks dog' --style 'watercolor painting'")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "FitConfig":
        """Read YAML (.yaml/.yml) or TOML (.toml); keyword overrides (e.g. CLI flags) win."""
        return cls.from_dict({**read_settings_file(path), **overrides})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def without_retired(values: dict, saved: bool = False) -> dict:
    """`values` without the retired settings (RETIRED) that do nothing; InputError for one that asks for the
    experiment (unless `saved`: a fit that was made with it still loads)."""
    asked = {k: v for k, v in values.items() if k in RETIRED and v != RETIRED[k]}
    if asked and not saved:
        name, value = next(iter(asked.items()))
        raise InputError(f"setting {name} ({value!r}) was an experiment measured as no gain and is no longer a "
                         f"fit setting (docs/toy-world.md; commit {RETIRED_AT} still runs it): leave it out")
    return {k: v for k, v in values.items() if k not in RETIRED}


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


# ---- the settings as data: types, scopes, and values read from text (prompt-table cells) ----

HUB_ID_AT_REVISION = re.compile(rf"^{HUB_ID_PATTERN}@[\w./-]+$")
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
_KIND_NAMES = {str: "text", int: "an integer", float: "a number", bool: "true or false"}


def settings(*scopes: str) -> list[dataclasses.Field]:
    """FitConfig's fields of these scopes (all fields without arguments), in declaration order."""
    return [f for f in dataclasses.fields(FitConfig) if not scopes or f.metadata["scope"] in scopes]


@functools.cache
def _fields(cls) -> tuple[dataclasses.Field, ...]:
    """dataclasses.fields, once per class: item ids hash the settings of every input of a job."""
    return dataclasses.fields(cls)


@functools.cache
def value_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(str | int | float | bool, whether None is allowed), from the field's annotation."""
    names = [part.strip() for part in str(f.type).split("|")]
    kinds = [n for n in names if n != "None"]
    return _TYPES[kinds[0]], len(kinds) < len(names)


def check_type(f: dataclasses.Field, value) -> None:
    kind, optional = value_type(f)
    if value is None and optional:
        return
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:  # an int is a fine float (lr: 1); a bool is not
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise InputError(f"setting {f.name} must be {_KIND_NAMES[kind]}, got {value!r}")
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        raise InputError(f"setting {f.name} must be one of {f.metadata['choices']}, got {value!r}")


def parse_value(f: dataclasses.Field, value):
    """A cell of a prompt table (text, or a number pyarrow already parsed) as this setting's type;
    None for an empty cell. Raises InputError naming the setting and the value."""
    kind, _ = value_type(f)
    if value is None or (isinstance(value, str) and not value.strip()) or value != value:  # NaN: empty
        return None
    try:
        if kind is str:
            return str(value).strip()
        if kind is bool:
            text = str(value).strip().lower()
            if text not in _BOOLS:
                raise ValueError
            return _BOOLS[text]
        if kind is int:
            number = float(value) if not isinstance(value, int) else value
            if isinstance(value, bool) or number != int(number):
                raise ValueError
            return int(number)
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{f.name} must be {_KIND_NAMES[kind]}, got {value!r}") from None


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def check_formats(formats) -> tuple[str, ...]:
    """A list or a comma-separated text of LoRA formats, checked: known, none twice, at least one."""
    names = tuple(f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip())
    unknown = [f for f in names if f not in LORA_FORMATS]
    if not names or unknown or len(set(names)) != len(names):
        raise InputError(f"LoRA formats must be one or more of {list(LORA_FORMATS)}, each once (the first is "
                         f"{{kind}}_lora.safetensors), got {formats!r}")
    return names


def check_number(name: str, value, *, integer: bool = False, minimum: float | None = None,
                 above: float | None = None, optional: bool = False):
    """A numeric option checked before anything starts: a finite number (an integer with `integer`), at least
    `minimum`, more than `above`; else one line naming it (`--workers must be an integer >= 1, got 0`).
    Returns the value. `optional`: None passes (the option's own default applies)."""
    if value is None and optional:
        return value
    kind = "an integer" if integer else "a number"
    bounds = ([f">= {minimum:g}"] if minimum is not None else []) + ([f"> {above:g}"] if above is not None else [])
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (not integer or isinstance(value, int)) and (minimum is None or value >= minimum) and \
        (above is None or value > above)
    if not ok:
        raise InputError(f"{name} must be {kind}{' ' + ' and '.join(bounds) if bounds else ''}, got {value!r}")
    return value
