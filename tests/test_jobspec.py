"""JobSpec: its groups are plain data Ray ships to workers, and `decompose`'s flags are derived from what each
field declares (pipeline/run/spec.py), as `unziplora fit`'s are from FitConfig."""

import dataclasses
import pickle

import pytest

from jobs.decompose import build_parser, job_spec
from pipeline.run.spec import (GROUPS, SECTIONS, Failure, Gate, JobSpec, Previews, RunState, Scaling, Tracking,
                               default_value, flag_kind, options)
from unziplora.errors import InputError


def parse(*flags: str) -> JobSpec:
    return job_spec(build_parser().parse_args(["--input", "in", "--output", "lib", *flags]), {})


def declared():
    """(group or None, field) of every user-facing option."""
    return [(None, f) for f in options(JobSpec)] + [(name, f) for name in SECTIONS for f in options(GROUPS[name])]


def test_every_option_has_its_flag_and_the_flags_defaults_are_the_declarations():
    flags = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings}
    for group, f in declared():
        action = flags[f.metadata["flag"]]
        assert action.dest == (f"{group}.{f.name}" if group else f.name) and action.help == f.metadata["help"]
    assert parse() == JobSpec(input="in", output="lib")  # no flag: the declared defaults, nothing repeated
    assert set(GROUPS) == {"scaling", "failure", "tracking", "previews", "gate", "state", "faults"}
    assert not options(RunState) and "state" not in SECTIONS and "faults" not in SECTIONS  # no flags


def test_each_flag_lands_in_its_group():
    job = parse("--workers", "3", "--gpus-per-worker", "0.5", "--executor", "train", "--lease-ttl", "30",
                "--wait-for-library", "5", "--no-tracking", "--tracking-uri", "http://m:5000", "--preview-steps", "2",
                "--preview-subjects", "cat, car", "--scorer", "toy", "--candidates", "2", "--min-split-score", "0.5",
                "--formats", "kohya,diffusers", "--storage-options", '{"anon": true}', "--recheck")
    assert job.scaling == Scaling(executor="train", workers=3, gpus_per_worker=0.5)
    assert job.failure == Failure(wait_for_library_s=5, lease_ttl_s=30)
    assert not job.tracking.enabled and job.tracking.uri == "http://m:5000"
    assert job.previews == Previews(steps=2, subjects=["cat", "car"], scorer="toy")
    assert (job.gate.candidates, job.gate.min_split_score) == (2, 0.5)
    assert job.lora_formats == ["kohya", "diffusers"] and job.storage_options == {"anon": True} and job.recheck
    job.check()


def test_a_bad_value_of_any_option_is_refused_naming_its_flag():
    checked = [(group, f) for group, f in declared() if f.metadata["check"] or f.metadata["choices"]]
    assert len(checked) >= 12
    for group, f in checked:
        job = JobSpec(input="in", output="lib")
        bad = job.replace(**{group: {f.name: float("nan")}}) if group else job.replace(**{f.name: float("nan")})
        with pytest.raises(InputError, match=f"^{f.metadata['flag']} must be"):
            bad.check()
    with pytest.raises(InputError, match="^--max-failed-fraction must be at most 1"):
        parse("--max-failed-fraction", "1.5").check()


def test_a_job_is_plain_data_and_comes_back_whole():
    job = parse("--workers", "2", "--candidates", "3").replace(state={"run_id": "r", "base_fingerprint": "fp"},
                                                               faults={"crash_once_on": ["img1"]})
    plain = job.to_dict()
    assert plain["scaling"]["workers"] == 2 and plain["state"]["run_id"] == "r"  # nested dicts, as Ray ships them
    assert JobSpec(**plain) == job and pickle.loads(pickle.dumps(job)) == job
    changed = job.replace(scaling={"workers": 1}, output="elsewhere")
    assert changed.scaling == dataclasses.replace(job.scaling, workers=1) and changed.output == "elsewhere"
    assert job.scaling.workers == 2 and changed.gate == job.gate  # a copy; the other groups stay
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.scaling.workers = 5  # a group changes by replace only


# the flags other commands share with decompose: (command, group, fields); each is the declaration's own
SHARED = [(("fit",), Gate, ("candidates", "max_candidates", "min_split_score")), (("fit",), Previews, ("scorer",)),
          (("fit",), JobSpec, ("lora_formats",)), (("registry", "sync"), Tracking, ("library", "log_lora_artifacts")),
          (("rescore",), Previews, ("steps", "subjects", "styles", "scorer"))] + [
    (command, Failure, ("wait_for_library_s",)) for command in (("registry", "sync"), ("repair",), ("forget",),
                                                                ("rescore",))]


def command_flags(*path: str) -> dict:
    """A `unziplora` subcommand's flags by name."""
    from jobs.cli import build_parser

    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if a.choices and name in a.choices).choices[name]
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings}


def test_the_flags_other_commands_share_with_the_job_are_its_declarations(capsys):
    for command, cls, names in SHARED:
        flags = command_flags(*command)
        for f in [f for f in options(cls) if f.name in names]:
            meta, action = f.metadata, flags[f.metadata["flag"]]
            # a rescore draws previews (0 steps is refused); a library's sync finds its prefix in registry.json
            own_words = {(("rescore",), "steps"): "(>= 1)", (("registry", "sync"), "library"): "registry.json"}
            assert (action.default, action.choices) == (default_value(f), meta["choices"])
            assert action.help == meta["help"] or own_words.get((command, f.name), "\0") in action.help, action.help
            plain = meta["flag"][2:].replace("-", "_")  # the dest argparse gives the flag: args.wait_for_library
            if flag_kind(f) is bool:  # a switch: no value
                assert (action.dest, action.nargs) == (plain, 0)
            else:
                assert (action.metavar, action.dest, action.type) == (meta["metavar"] or plain.upper(), plain,
                                                                      flag_kind(f))
    # fit's --gate-steps is the job's --preview-steps under its own name (at least 1: it scores the panels)
    assert command_flags("fit")["--gate-steps"].default == Previews().steps
    # and each command checks its value as the job does, naming the flag
    from jobs.cli import main

    for argv, says in [(["repair", "lib", "--wait-for-library", "-1"], "--wait-for-library must be"),
                       (["rescore", "lib", "--preview-steps", "0"], "--preview-steps must be an integer >= 1"),
                       (["fit", "x.png", "--out", "o", "--content", "a", "--style", "b", "--candidates", "0"],
                        "--candidates must be an integer >= 1"),
                       (["fit", "x.png", "--out", "o", "--content", "a", "--style", "b", "--min-split-score", "2"],
                        "--min-split-score is a score in [0, 1]")]:
        assert main(argv) == 2 and says in capsys.readouterr().err, argv
