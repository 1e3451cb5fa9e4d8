"""The job's settings: plain data, shipped by Ray to every task and worker.

Grouped by concern, the way Ray Train splits ScalingConfig / RunConfig / FailureConfig:
- what a user declares: the job's own fields (input, output, prompts, formats, ...) and the groups `Scaling`,
  `Failure`, `Tracking`, `Previews` and `Gate`. Each of their fields declares its `decompose` flag, help and
  check once (`option`); jobs/decompose.py derives its command line, defaults and the JobSpec from them
  (`add_flags`, `from_flags`), as `unziplora fit` derives its flags from FitConfig's fields; the commands that
  share a few of these settings (`fit`'s gate, `rescore`'s previews, `--wait-for-library`) derive those too;
- `RunState`: what the driver sets for the workers as the job runs (run id, base fingerprint, MLflow ids);
- `Faults`: fault injection, for tests and benchmarks only (no flag).

`to_dict()` is plain nested data; `JobSpec(**job.to_dict())` makes the same job again (a group may be given as
a dict of its fields), and `job.replace(scaling={"workers": 2})` changes some fields of a group.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import MISSING, dataclass, field

from unziplora.config import DEFAULT_FORMATS, LORA_FORMATS

EXECUTORS = ("actor-pool", "train")


def option(default=MISSING, help: str | None = None, *, flag: str, check: dict | None = None,
           choices: tuple | None = None, metavar: str | None = None):
    """A user-facing setting of the job: its `decompose` flag (a bool whose default is True is turned off by
    `--no-...`), the flag's help, and the check of its value (`check_number`'s rule, or `choices`), which names
    the flag. No default: the flag is required. A list or dict default is copied for each job."""
    metadata = {"flag": flag, "help": help, "check": check, "choices": choices, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def options(cls) -> list[dataclasses.Field]:
    """The fields of a JobSpec or a group that are user-facing settings (each with its flag)."""
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def default_value(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def add_flags(parser, cls, prefix: str | None = "", names: tuple[str, ...] | None = None,
              helps: dict[str, str] | None = None) -> None:
    """One flag per option JobSpec or one of its groups declares (or per field of `names`): its flag, help,
    default, choices and metavar are the declaration's (`helps`: another command's own words for some fields).
    The value lands in `args.<prefix><field>`; with prefix None in the dest argparse gives the flag
    (`--wait-for-library`: args.wait_for_library), as a command's own."""
    for f in options(cls):
        if names is not None and f.name not in names:
            continue
        kind, meta = flag_kind(f), f.metadata
        flag = dict(dest=flag_dest(f, prefix), help=(helps or {}).get(f.name, meta["help"]))
        if f.default is MISSING and f.default_factory is MISSING:
            flag["required"] = True
        else:
            flag["default"] = default_value(f)
        if kind is bool:  # a switch: on, or off (`--no-...`) where the default is on
            flag["action"] = "store_false" if flag["default"] else "store_true"
        else:  # the metavar argparse would give a flag of this name (the dest may name the group too)
            flag |= dict(type=kind, choices=meta["choices"], metavar=meta["metavar"] or (
                None if meta["choices"] else meta["flag"][2:].replace("-", "_").upper()))
        parser.add_argument(meta["flag"], **flag)


def from_flags(args, cls, prefix: str | None = "", names: tuple[str, ...] | None = None):
    """The group whose flags `add_flags` added (same prefix and names): those fields from their flags, the
    others their defaults. Not checked: `check()` (or check_options) it."""
    return cls(**{f.name: getattr(args, flag_dest(f, prefix)) for f in options(cls)
                  if names is None or f.name in names})


def flag_dest(f: dataclasses.Field, prefix: str | None) -> str:
    return f.metadata["flag"][2:].replace("-", "_") if prefix is None else prefix + f.name


def check_options(settings) -> None:
    """Every declared check of a JobSpec's or a group's own fields: one line naming the flag."""
    from unziplora.config import check_number
    from unziplora.errors import InputError

    for f in options(type(settings)):
        value, flag = getattr(settings, f.name), f.metadata["flag"]
        if f.metadata["choices"] and value not in f.metadata["choices"]:
            raise InputError(f"{flag} must be one of {list(f.metadata['choices'])}, got {value!r}")
        if f.metadata["check"] is not None:
            check_number(flag, value, **f.metadata["check"])


@dataclass(frozen=True)
class Scaling:
    """How many fit workers, what each one holds, and how many images it takes at once (executors.py)."""

    executor: str = option("actor-pool", "actor-pool (Ray Data, default) or train (Ray Train TorchTrainer)",
                           flag="--executor", choices=EXECUTORS)
    workers: int = option(1, "fit workers (one base model each)", flag="--workers",
                          check=dict(integer=True, minimum=1))
    gpus_per_worker: float | None = option(None, "default: 1 if the cluster has GPUs", flag="--gpus-per-worker",
                                           check=dict(minimum=0, optional=True))
    cpus_per_worker: float = option(1.0, "CPUs each fit worker holds (default 1)", flag="--cpus-per-worker",
                                    check=dict(above=0))
    fits_per_worker: int = option(1, "each worker trains up to K images together, one batched UNet pass per step "
                                  "(more fits per hour per device; benchmarks/multifit.py)",
                                  flag="--fits-per-worker", metavar="K", check=dict(integer=True, minimum=1))
    # batches a worker holds at once: one on the device, the others reading, uploading and tracking meanwhile
    # (0: 2 on a GPU worker, whose device time is what the job pays for; 1 on a CPU worker)
    batches_in_flight: int = option(0, "batches a worker holds at once: one fits on the device while the others "
                                    "are read, uploaded and tracked (default 0: 2 on a GPU worker, 1 on a CPU one; "
                                    "benchmarks/device_overlap.py)", flag="--batches-in-flight", metavar="N",
                                    check=dict(integer=True, minimum=0))
    # Ray Train: a worker group that cannot start within this (a node lost, a cluster smaller than asked) goes on
    # with the workers the live nodes hold (executors.run_train)
    train_start_timeout_s: float = option(120.0, "executor train: a worker group that cannot start within this (a "
                                          "node lost, a cluster smaller than --workers) goes on with the workers the "
                                          "live nodes hold, or the job fails", flag="--train-start-timeout",
                                          metavar="SECONDS", check=dict(above=0))

    @property
    def in_flight(self) -> int:
        return self.batches_in_flight or (2 if self.gpus_per_worker else 1)


@dataclass(frozen=True)
class Failure:
    """What fails an image, the job, and how the job waits for (or takes over) the library (lease.py)."""

    # an image whose fit killed its worker this often is failed (manifest.crashes)
    max_attempts: int = option(3, "give up on an image after this many crashes", flag="--max-attempts",
                               check=dict(integer=True, minimum=1))
    # the share of inputs that may fail with the job still a success (exit status 0); more: exit status 3
    max_failed_fraction: float = option(0.0, "exit status 0 while at most this share of the inputs failed (default "
                                        "0: any failed input makes the exit status 3, so a RayJob in which images "
                                        "failed is not reported as succeeded)", flag="--max-failed-fraction",
                                        metavar="F", check=dict(minimum=0))
    # one job writes a library at a time (lease.py): wait this long for another job to finish, else refuse;
    # a job that stopped heartbeating for lease_ttl_s (killed) is taken over
    wait_for_library_s: float = option(0.0, "if another job is writing the library (--output), wait up to this "
                                       "long for it "
                                       "(default: refuse at once); a job that died is taken over --lease-ttl "
                                       "(120 s) after its last heartbeat", flag="--wait-for-library",
                                       metavar="SECONDS", check=dict(minimum=0))
    lease_ttl_s: float = option(120.0, "this job heartbeats its hold on --output every quarter of this; a job "
                                "that sent none for this long (killed) is taken over by the next (default 120)",
                                flag="--lease-ttl", metavar="SECONDS", check=dict(above=0))

    def check(self) -> None:
        from unziplora.errors import InputError

        check_options(self)
        if self.max_failed_fraction > 1:
            raise InputError(f"--max-failed-fraction must be at most 1, got {self.max_failed_fraction!r}")


@dataclass(frozen=True)
class Tracking:
    """MLflow tracking (pipeline/registry/tracking.py): uri None = the default for --output (SQLite next to a local
    library); library = the registry prefix (default: the output folder's name)."""

    enabled: bool = option(True, "no MLflow runs or registry", flag="--no-tracking")
    uri: str | None = option(None, "MLflow tracking/registry URI, e.g. http://mlflow:5000 (default: "
                             "$MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db for a local --output; none "
                             "for a remote one)", flag="--tracking-uri")
    library: str | None = option(None, "registry prefix: models <library>-content, <library>-style (default: the "
                                 "--output folder's name)", flag="--library")
    # also copy the LoRA files into the runs (else referenced by URI)
    log_lora_artifacts: bool = option(False, "also copy the LoRA files into the MLflow runs (default: referenced "
                                      "by URI)", flag="--log-lora-artifacts")
    # also register each LoRA as an mlflow.diffusers model (hub/folder bases)
    log_diffusers_models: bool = option(False, "also register each LoRA as an mlflow.diffusers model (MLmodel: "
                                        "base pipeline + LoRA, loadable with mlflow.pyfunc) as "
                                        "<library>-<kind>-diffusers, when the base model is a hub id or a local "
                                        "folder", flag="--log-diffusers-models")


@dataclass(frozen=True)
class Previews:
    """Each fit's preview images (pipeline/quality/previews.py) and the quality scores drawn from them (scoring.py)."""

    # sampling steps of the content-only / style-only preview images; 0: none
    steps: int = option(8, "sampling steps of the content/style preview images of each fit (0: no previews)",
                        flag="--preview-steps", check=dict(integer=True, minimum=0))
    subjects: list[str] = option([], "what the style preview draws the style LoRA on (default: the base model's; "
                                 "SDXL: house, cat, car, tree; toy: its shapes); the source's own class word is "
                                 "skipped", flag="--preview-subjects", metavar="A,B,C")
    styles: list[str] = option([], "the styles the content preview draws the content LoRA in (default: the base "
                               "model's)", flag="--preview-styles", metavar="A,B,C")
    scorer: str = option("auto", "quality scores of each fit from its previews, into its manifest row and MLflow "
                         "run: auto (the toy world's judges on the toy model, else none) | none | toy | base (the "
                         "base model's UNet as a zero-shot classifier: no extra weights) | clip:/local/dir | "
                         "tiny[:seed] | package.module:factory (an image embedder: cosine similarity to the source, "
                         "or a scorer)", flag="--scorer")


@dataclass(frozen=True)
class Gate:
    """Quality control (pipeline/quality/gate.py): how many candidate fits of each image, and when a split is
    good enough."""

    # fitted together for each image first
    candidates: int = option(1, "fit each image with N seeds together, score each candidate with --scorer on its "
                             "own preview panels, keep the best (default 1: no gate)", flag="--candidates",
                             metavar="N", check=dict(integer=True, minimum=1))
    # at most this many in all (0: `candidates`)
    max_candidates: int = option(0, "while an image's best split score is below --min-split-score, fit N more, up "
                                 "to M in all", flag="--max-candidates", metavar="M",
                                 check=dict(integer=True, minimum=0))
    # below it, more candidates (up to max_candidates); the best found is kept
    min_split_score: float = option(0.0, "the split score (mean of content kept, style carried, 1 - each leak; "
                                    "0-1) a fit must reach; one that never does is kept as the best found, with "
                                    "gate_passed false", flag="--min-split-score", metavar="S",
                                    check=dict(minimum=0))

    # 1: every candidate trained to the end
    select_after: float = option(1.0, "score the candidates after this fraction of their training steps and train "
                                 "only each image's best on (the others stop there: less device time; 1: every "
                                 "candidate trained to the end)", flag="--select-after", metavar="F",
                                 check=dict(minimum=0))

    # images drawn per prompt for each candidate's split score (pipeline/quality/gate.py GATE_IMAGES)
    images_per_prompt: int = option(2, "images the gate draws per prompt of each candidate's panels (more: more "
                                    "sampling and scoring time; on toy, 4 chose no better than 2)",
                                    flag="--gate-images", metavar="N", check=dict(integer=True, minimum=1))

    @property
    def active(self) -> bool:
        return self.limit > 1

    @property
    def limit(self) -> int:
        return max(self.candidates, self.max_candidates)

    def check(self) -> None:
        from unziplora.errors import InputError

        check_options(self)
        if self.min_split_score > 1:
            raise InputError(f"--min-split-score is a score in [0, 1], got {self.min_split_score!r}")
        if not 0 < self.select_after <= 1:
            raise InputError(f"--select-after is a fraction of the training steps in (0, 1], got {self.select_after!r}")
        if self.max_candidates and self.max_candidates < self.candidates:
            raise InputError(f"--max-candidates ({self.max_candidates}) is below --candidates ({self.candidates})")

    def identity(self) -> dict:
        """What an item id hashes of the gate, merged into its settings: another gate chooses another fit. (No
        gate: nothing, so ungated libraries keep their ids.)"""
        if not self.active:
            return {}
        # defaults of settings added later are left out: gated libraries made before them keep their ids
        later = {("select_after", 1.0), ("images_per_prompt", 2)}
        return {"gate": {k: v for k, v in dataclasses.asdict(self).items() if (k, v) not in later}}


@dataclass(frozen=True)
class RunState:
    """Set by the driver as the job runs (run_job, tracking.start_job), for the workers: never a user's."""

    run_id: str = ""  # this run's id (run_job: the time and a random tail, unless the caller gave one)
    base_fingerprint: str = ""  # the exact base weights (unziplora.locate): part of every item id
    code_version: str = ""  # the driver's (worker.code_version): rows and runs name the code that made them
    mlflow_experiment_id: str = ""
    mlflow_parent_run_id: str = ""
    tracking_error: str = ""  # MLflow could not be reached when the job started: fits are not tracked


@dataclass(frozen=True)
class Faults:
    """Fault injection, for tests and benchmarks only: kill the worker process when it starts an item whose URL
    contains one of these strings (on the first attempt only, or on every attempt), or on the first attempt once
    the gate has noted the item's first pass of candidates and is about to fit more."""

    crash_once_on: list[str] = field(default_factory=list)
    crash_always_on: list[str] = field(default_factory=list)
    crash_between_candidates_on: list[str] = field(default_factory=list)


@dataclass
class JobSpec:
    """Everything a worker needs; plain data so Ray can ship it to every worker."""

    input: str = option(help="folder or URL (s3://, gs://, file://, path) of images", flag="--input")
    output: str = option(help="folder or URL of the LoRA library (created)", flag="--output")
    prompts: str | None = option(None, "CSV/Parquet prompt table (default: prompts.csv|parquet in --input)",
                                 flag="--prompts")
    default_content: str | None = option(None, "content trigger for images without a prompt row",
                                         flag="--default-content")
    default_style: str | None = option(None, "style description for images without a prompt row",
                                       flag="--default-style")
    fit: dict = field(default_factory=dict)  # FitConfig settings shared by every item (steps, base_model, ...)
    storage_options: dict = option({}, 'fsspec options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
                                   flag="--storage-options")
    # the LoRA files' formats (unziplora.export): the first is {kind}_lora.safetensors; kohya alone by default
    lora_formats: list[str] = option(
        list(DEFAULT_FORMATS), f"LoRA file formats, of {', '.join(LORA_FORMATS)} (default {','.join(DEFAULT_FORMATS)}: "
        "each LoRA once, in the file diffusers, ComfyUI and A1111 all load); the first is {kind}_lora.safetensors, "
        "others {kind}_lora_{format}.safetensors", flag="--formats", metavar="FORMAT[,FORMAT]")
    # reuse fits a library made before item ids held the base model's fingerprint (manifest schema < 3): the
    # user vouches that they were made with these same weights
    adopt_legacy: bool = option(False, "reuse the fits of a library made before item ids held the base model's "
                                "fingerprint (manifest schema < 3), vouching that they were made with these same "
                                "weights", flag="--adopt-legacy")
    # read every image and every completion marker, not trusting the manifest's index (job.plan_items): after
    # files were changed behind the library's back (an image rewritten with its old size and time, a fit deleted)
    recheck: bool = option(False, "read every image and completion marker again instead of trusting the manifest "
                           "(a re-run reads only images whose size or time/ETag changed, and takes ok rows as "
                           "complete)", flag="--recheck")
    scaling: Scaling = field(default_factory=Scaling)
    failure: Failure = field(default_factory=Failure)
    tracking: Tracking = field(default_factory=Tracking)
    previews: Previews = field(default_factory=Previews)
    gate: Gate = field(default_factory=Gate)
    state: RunState = field(default_factory=RunState)
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self):
        for name, cls in GROUPS.items():  # a group given as a dict of its fields (to_dict's, or a caller's)
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "JobSpec":
        """A copy with `changes`: a field's new value, or for a group a dict of the fields that change
        (`job.replace(state={"run_id": "r"})`; the group's other fields stay)."""
        changes = {name: dataclasses.replace(getattr(self, name), **value) if name in GROUPS and
                   isinstance(value, dict) else value for name, value in changes.items()}
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Every setting of the job that is a number or a choice, refused in one line naming its flag before
        anything starts (Ray, the library's lease, an MLflow run): a bad value never costs a cluster."""
        from unziplora.config import check_formats

        check_options(self)
        check_options(self.scaling)
        self.failure.check()
        check_options(self.previews)
        check_formats(self.lora_formats)
        self.gate.check()


# the groups, by their JobSpec field; the user-facing ones are a section of `decompose --help` each
GROUPS = {f.name: f.default_factory for f in dataclasses.fields(JobSpec) if f.default_factory in
          (Scaling, Failure, Tracking, Previews, Gate, RunState, Faults)}
SECTIONS = {
    "scaling": "scaling (fit workers on Ray: executors.py)",
    "failure": "failures, and the library's lease (one job writes a library at a time: lease.py)",
    "tracking": "MLflow tracking and model registry",
    "previews": "previews and quality scores of each fit",
    "gate": "quality control (each image's split checked: pipeline/quality/gate.py)",
}


def words(text: str) -> list[str]:
    """A comma-separated flag value as its words."""
    return [w.strip() for w in text.split(",") if w.strip()]


def json_object(text: str) -> dict:
    """A flag's JSON object (fsspec options): an argparse error for anything else. The text is not echoed, as it
    may hold credentials."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is expected, e.g. '{{\"endpoint_url\": "
                                         f"\"http://127.0.0.1:9000\"}}', not a {type(value).__name__}")
    return value


def add_storage_options(parser, of: str = "the library") -> None:
    """`--storage-options` as every command reads it (decompose's comes from JobSpec's declaration)."""
    parser.add_argument("--storage-options", type=json_object, default={}, metavar="JSON",
                        help=f"fsspec options of {of} as a JSON object")


def flag_kind(f: dataclasses.Field):
    """How a declared option reads from its flag: bool, a list of words, JSON, or str / int / float."""
    kind = str(f.type).split("|")[0].strip()
    return {"bool": bool, "list[str]": words, "dict": json_object, "str": str, "int": int, "float": float}[kind]
