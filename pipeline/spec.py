"""The job's settings: plain data, shipped by Ray to every task and worker."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

EXECUTORS = ("actor-pool", "train")


@dataclass(frozen=True)
class Gate:
    """Quality control (pipeline/gate.py): how many candidate fits of each image, and when a split is good enough."""

    candidates: int = 1  # fitted together for each image first
    max_candidates: int = 0  # at most this many in all (0: `candidates`)
    min_split_score: float = 0.0  # below it, more candidates (up to max_candidates); the best found is kept

    @property
    def active(self) -> bool:
        return self.limit > 1

    @property
    def limit(self) -> int:
        return max(self.candidates, self.max_candidates)

    def check(self) -> None:
        from unziplora.config import check_number
        from unziplora.errors import InputError

        check_number("--candidates", self.candidates, integer=True, minimum=1)
        check_number("--max-candidates", self.max_candidates, integer=True, minimum=0)
        check_number("--min-split-score", self.min_split_score, minimum=0)
        if self.min_split_score > 1:
            raise InputError(f"--min-split-score is a score in [0, 1], got {self.min_split_score!r}")
        if self.max_candidates and self.max_candidates < self.candidates:
            raise InputError(f"--max-candidates ({self.max_candidates}) is below --candidates ({self.candidates})")

    def identity(self) -> dict:
        """What an item id hashes of the gate, merged into its settings: another gate chooses another fit. (No
        gate: nothing, so ungated libraries keep their ids.)"""
        return {"gate": dataclasses.asdict(self)} if self.active else {}


@dataclass
class JobSpec:
    """Everything a worker needs; plain data so Ray can ship it to every worker."""

    input: str
    output: str
    prompts: str | None = None
    default_content: str | None = None
    default_style: str | None = None
    fit: dict = field(default_factory=dict)  # FitConfig settings shared by every item (steps, base_model, ...)
    executor: str = "actor-pool"
    workers: int = 1
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    fits_per_worker: int = 1  # a worker takes up to this many items at once and trains them together
    # batches a worker holds at once: one on the device, the others reading, uploading and tracking meanwhile
    # (0: 2 on a GPU worker, whose device time is what the job pays for; 1 on a CPU worker)
    batches_in_flight: int = 0
    max_attempts: int = 3  # an image whose fit killed its worker this often is failed (manifest.crashes)
    # Ray Train: a worker group that cannot start within this (a node lost, a cluster smaller than asked) goes on
    # with the workers the live nodes hold (executors.run_train)
    train_start_timeout_s: float = 120.0
    # one job writes a library at a time (lease.py): wait this long for another job to finish, else refuse;
    # a job that stopped heartbeating for lease_ttl_s (killed) is taken over
    wait_for_library_s: float = 0.0
    lease_ttl_s: float = 120.0
    storage_options: dict = field(default_factory=dict)
    run_id: str = ""
    # MLflow tracking (pipeline/tracking.py): tracking_uri None = the default for --output (SQLite next to a
    # local library); library = the registry prefix (default: the output folder's name)
    tracking: bool = True
    tracking_uri: str | None = None
    library: str | None = None
    log_lora_artifacts: bool = False  # also copy the LoRA files into the runs (else referenced by URI)
    log_diffusers_models: bool = False  # also register each LoRA as an mlflow.diffusers model (hub/folder bases)
    preview_steps: int = 8  # sampling steps of the content-only / style-only preview images; 0: none
    preview_subjects: list[str] = field(default_factory=list)  # style previews draw these (default: the model's)
    preview_styles: list[str] = field(default_factory=list)  # content previews draw in these
    scorer: str = "auto"  # quality scores from the previews (pipeline/scoring.py): auto | none | a spec
    # quality control (pipeline/gate.py): candidate fits of each image, scored by `scorer`, the best kept
    candidates: int = 1
    max_candidates: int = 0
    min_split_score: float = 0.0
    # the LoRA files' formats (unziplora.export): the first is {kind}_lora.safetensors; kohya alone by default
    lora_formats: list[str] = field(default_factory=lambda: ["kohya"])
    # reuse fits a library made before item ids held the base model's fingerprint (manifest schema < 3): the
    # user vouches that they were made with these same weights
    adopt_legacy: bool = False
    # read every image and every completion marker, not trusting the manifest's index (job.plan_items): after
    # files were changed behind the library's back (an image rewritten with its old size and time, a fit deleted)
    recheck: bool = False
    # the share of inputs that may fail with the job still a success (exit status 0); more: exit status 3
    max_failed_fraction: float = 0.0
    # set by run_job for the workers
    base_fingerprint: str = ""  # the exact base weights (unziplora.locate): part of every item id
    code_version: str = ""  # the driver's (worker.code_version): rows and runs name the code that made them
    mlflow_experiment_id: str = ""
    mlflow_parent_run_id: str = ""
    tracking_error: str = ""  # MLflow could not be reached when the job started: fits are not tracked
    # Fault injection, for tests and benchmarks: kill the worker process when it starts an item whose URL
    # contains one of these strings (on the first attempt only, or on every attempt).
    crash_once_on: list[str] = field(default_factory=list)
    crash_always_on: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def in_flight(self) -> int:
        return self.batches_in_flight or (2 if self.gpus_per_worker else 1)

    @property
    def gate(self) -> Gate:
        return Gate(self.candidates, self.max_candidates, self.min_split_score)

    def check(self) -> None:
        """Every setting of the job that is a number or a choice, refused in one line naming its flag before
        anything starts (Ray, the library's lease, an MLflow run): a bad value never costs a cluster."""
        from unziplora.config import check_number
        from unziplora.errors import InputError

        if self.executor not in EXECUTORS:
            raise InputError(f"--executor must be one of {list(EXECUTORS)}, got {self.executor!r}")
        for name, flag, rule in NUMBERS:
            check_number(flag, getattr(self, name), **rule)
        from unziplora.config import check_formats

        check_formats(self.lora_formats)
        if self.max_failed_fraction > 1:
            raise InputError(f"--max-failed-fraction must be at most 1, got {self.max_failed_fraction!r}")
        self.gate.check()


# the job's numbers: (field, flag, check_number's rule)
NUMBERS = (
    ("workers", "--workers", dict(integer=True, minimum=1)),
    ("fits_per_worker", "--fits-per-worker", dict(integer=True, minimum=1)),
    ("batches_in_flight", "--batches-in-flight", dict(integer=True, minimum=0)),
    ("cpus_per_worker", "--cpus-per-worker", dict(above=0)),
    ("gpus_per_worker", "--gpus-per-worker", dict(minimum=0, optional=True)),
    ("max_attempts", "--max-attempts", dict(integer=True, minimum=1)),
    ("preview_steps", "--preview-steps", dict(integer=True, minimum=0)),
    ("train_start_timeout_s", "--train-start-timeout", dict(above=0)),
    ("wait_for_library_s", "--wait-for-library", dict(minimum=0)),
    ("lease_ttl_s", "lease_ttl_s", dict(above=0)),
    ("max_failed_fraction", "--max-failed-fraction", dict(minimum=0)),
)
