"""The command line, settings files, prompts and bad input: clear errors, nothing half-written."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from unziplora import FitConfig, InputError, fit, load_base_model, load_fit
from unziplora.cli import default_threads, main
from unziplora.fit_files import CONFIG, FILES


def test_prompts_are_derived_from_trigger_and_style():
    p = FitConfig(content="sks dog", style="watercolor painting").prompts()
    assert p == ("A sks dog in watercolor painting style", "A sks dog", "A dog in watercolor painting style")
    p = FitConfig(content="sks", style="ink", class_word="cat", prompt="x", content_prompt="y").prompts()
    assert p == ("x", "y", "A cat in ink style")


@pytest.mark.parametrize("bad", [dict(content=" "), dict(style=""), dict(steps=0), dict(rank=-1),
                                 dict(column_ratio=0.5), dict(precision="fp8"), dict(init="ones"),
                                 dict(recalibrations=10, steps=5)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(InputError):
        FitConfig(**{"content": "sks dog", "style": "ink", **bad})


def test_a_hub_revision_is_given_as_org_name_at_rev_or_as_a_setting():
    at = FitConfig(content="a b", style="c", base_model="org/name@v2")
    assert (at.base_model, at.revision) == ("org/name", "v2")
    assert FitConfig(content="a b", style="c", base_model="org/name", revision="v2") == at
    with pytest.raises(InputError, match="give one"):
        FitConfig(content="a b", style="c", base_model="org/name@v2", revision="v3")


def test_setting_types_are_checked_with_the_name_of_the_setting(tmp_path, sample_image, capsys):
    for bad, says in ((dict(steps="abc"), "steps must be an integer, got 'abc'"), (dict(steps=4.7), "got 4.7"),
                      (dict(gradient_checkpointing="yes"), "true or false"), (dict(lr="fast"), "a number")):
        with pytest.raises(InputError, match=says):
            FitConfig(content="a b", style="c", **bad)
    assert FitConfig(content="a b", style="c", lr=1).lr == 1.0 and isinstance(FitConfig(content="a b", style="c",
                                                                                          lr=1).lr, float)
    (tmp_path / "bad.toml").write_text('content = "sks dog"\nstyle = "ink"\nsteps = "abc"\n')
    assert main(["fit", str(sample_image), "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "error: setting steps must be an integer, got 'abc'"


def test_calibration_schedule():
    assert FitConfig(content="a b", style="c").calibration_steps == [0, 200, 400]
    assert FitConfig(content="a b", style="c", steps=10, recalibrations=2).calibration_steps == [0, 5]


def test_learning_rate_defaults_to_the_base_models():
    assert FitConfig(content="a b", style="c").lr == 5e-5  # SPEC's, sized for SDXL
    assert FitConfig(content="a b", style="c", base_model="toy").lr == 1e-3
    assert FitConfig(content="a b", style="c", base_model="toy", lr=2e-4).lr == 2e-4
    # the saved settings hold the number, so a fit reloads (and an item hashes) the same either way
    resolved = FitConfig(content="a b", style="c", base_model="toy")
    assert FitConfig.from_dict(resolved.to_dict()) == resolved == FitConfig(content="a b", style="c",
                                                                              base_model="toy", lr=1e-3)


def test_cli_fit_with_yaml_then_toml_and_config_reproduces(sample_image, tmp_path, capsys):
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump({"content": "sks dog", "style": "ink wash", "steps": 3,
                                                       "rank": 2, "save_precision": "fp32"}))
    assert main(["fit", str(sample_image), "--config", str(tmp_path / "fit.yaml"), "--seed", "5",
                 "--out", str(tmp_path / "a"), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(tmp_path / "a") and summary["mse"] > 0
    first = load_fit(tmp_path / "a")
    assert first.config.seed == 5 and first.config.steps == 3 and first.config.resolution == 64  # flag + file
    # the written config.yaml repeats the fit exactly
    assert main(["fit", str(sample_image), "--config", str(tmp_path / "a" / CONFIG),
                 "--out", str(tmp_path / "b"), "--quiet"]) == 0
    second = load_fit(tmp_path / "b")
    for kind in ("content", "style"):
        a, b = first.lora_state_dict(kind), second.lora_state_dict(kind)
        assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "fit.toml").write_text('content = "sks dog"\nstyle = "ink"\nsteps = 3\nrank = 2\nseed = 9\n')
    assert main(["fit", str(sample_image), "--config", str(tmp_path / "fit.toml"), "--out",
                 str(tmp_path / "c"), "--quiet", "--steps", "4"]) == 0
    third = load_fit(tmp_path / "c").config  # the file's values, a flag winning over the file
    assert (third.content, third.style, third.rank, third.seed, third.steps) == ("sks dog", "ink", 2, 9, 4)


def test_cli_errors_are_clear_and_write_nothing(sample_image, tmp_path, capsys):
    assert main(["fit", str(tmp_path / "missing.png"), "--content", "sks dog", "--style", "ink",
                 "--out", str(tmp_path / "o"), "--steps", "3"]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["fit", str(sample_image), "--content", "  ", "--style", "ink", "--out", str(tmp_path / "o")]) == 2
    assert "content text is empty" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("colour: red\n")
    assert main(["fit", str(sample_image), "--config", str(tmp_path / "bad.yaml"), "--content", "a b",
                 "--style", "c", "--out", str(tmp_path / "o")]) == 2
    assert "unknown settings ['colour']" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["fit", str(sample_image), "--content", "sks dog", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "error: give --style (or the same keys in a --config file)"


def test_default_threads_are_the_cores_others_leave_free():
    assert default_threads(cores=2, load=2.3, most=2) == 1  # a busy 2-core machine: 1 (measured ~5x faster)
    assert default_threads(cores=2, load=1.2, most=2) == 1
    assert default_threads(cores=2, load=0.2, most=2) == 2  # nobody else: torch's default
    assert default_threads(cores=16, load=3.0, most=8) == 8  # never more than torch's default
    assert default_threads(cores=16, load=40.0, most=8) == 1  # never fewer than one
    assert 1 <= default_threads() <= (os.cpu_count() or 1)  # this machine's


def test_fit_says_its_threads_and_shows_seconds_per_step(sample_image, tmp_path, capsys):
    from tqdm import tqdm

    from unziplora.training import BAR_FORMAT

    for n, elapsed, says in ((10, 20.0, "2.00s/step"), (10, 0.5, "0.05s/step"), (0, 0.0, "?s/step")):
        assert says in tqdm.format_meter(n, 600, elapsed, unit="step", bar_format=BAR_FORMAT, prefix="unziplora fit")
    assert main(["fit", str(sample_image), "--content", "sks dog", "--style", "ink", "--steps", "3", "--rank", "2",
                 "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "unziplora fit: 1 torch thread (the cores other processes leave free; --threads N to choose)" in err
    assert "s/step" in err  # the bar, drawn at least at its start
    # the last lines: the resolution it trained at, when the image had another size, and what to run next
    from PIL import Image

    size = Image.open(sample_image).size
    said = f"unziplora fit: trained at 64 px on the shorter side (the base model's, or --resolution), from a " \
           f"{size[0]}x{size[1]} image"
    assert min(size) == 80 and said in err
    assert f"unziplora generate {tmp_path / 'a'} --out combined.png" in err
    assert f"--style-from {tmp_path / 'a'} --prompt 'A dog in ink style' --out style.png" in err
    assert main(["fit", str(sample_image), "--content", "sks dog", "--style", "ink", "--steps", "3", "--rank", "2",
                 "--out", str(tmp_path / "b"), "--threads", "1"]) == 0
    assert "unziplora fit: 1 torch thread (--threads)" in capsys.readouterr().err
    assert main(["fit", str(sample_image), "--content", "sks dog", "--style", "ink", "--steps", "3", "--rank", "2",
                 "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_generate_writes_pngs(tiny_base, sample_image, tmp_path, recwarn, capfd):
    fit(sample_image, FitConfig(content="sks dog", style="ink", steps=3, rank=2), base=tiny_base,
        out_dir=tmp_path / "f", progress=False)
    capfd.readouterr()
    assert main(["generate", str(tmp_path / "f"), "--mode", "direct", "--out", str(tmp_path / "g" / "d.png"),
                 "--steps", "1", "--device", "cpu", "--quiet"]) == 0
    # two LoRAs loaded side by side (peft warns of the second), a base model loaded (its bars): none of it shown
    assert not [w for w in recwarn if "peft_config" in str(w.message)]
    assert "Loading" not in capfd.readouterr().err
    assert main(["generate", str(tmp_path / "f"), "--out", str(tmp_path / "g" / "both.png"), "--steps", "2",
                 "--num-images", "2", "--device", "cpu"]) == 0
    assert (tmp_path / "g" / "both_0.png").is_file() and (tmp_path / "g" / "both_1.png").is_file()
    assert main(["generate", "--style-from", str(tmp_path / "f"), "--prompt", "a cat in ink style",
                 "--out", str(tmp_path / "g" / "s.png"), "--steps", "2", "--device", "cpu"]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "g" / "s.png").size == (64, 64)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "unziplora.cli", "fit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--column-ratio" in out.stdout and "--gradient-checkpointing" in out.stdout


def test_long_prompt_is_truncated_with_warning(tiny_base, sample_image):
    long_style = " ".join(["watercolor"] * 90)
    with pytest.warns(UserWarning, match="truncated"):
        fit(sample_image, FitConfig(content="sks dog", style=long_style, steps=3, rank=2), base=tiny_base,
            progress=False)


def test_resolution_must_fit_the_unet(tiny_base, sample_image):
    with pytest.raises(InputError, match="multiple of 32"):
        fit(sample_image, FitConfig(content="sks dog", style="ink", steps=3, resolution=48), base=tiny_base,
            progress=False)


def test_small_image_is_upscaled_with_warning(tiny_base, tmp_path):
    from PIL import Image
    Image.new("RGB", (20, 30), (10, 200, 30)).save(tmp_path / "small.png")
    with pytest.warns(UserWarning, match="upscal"):
        fit(tmp_path / "small.png", FitConfig(content="sks dog", style="ink", steps=3, rank=2), base=tiny_base,
            progress=False)


def test_corrupt_image_fails_before_training(tiny_base, tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(InputError):
        fit(tmp_path / "x.png", FitConfig(content="sks dog", style="ink", steps=3), base=tiny_base,
            out_dir=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_tiny_tokenizers_match_clip():
    base = load_base_model("tiny", device="cpu")
    assert base.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = base.tokenizer_2("a cat", padding="max_length").input_ids
    assert len(padded) == 77 and padded[4] == 0  # SDXL's second tokenizer pads with "!"


def test_cli_formats_and_export(sample_image, tmp_path, capsys):
    """`fit --formats` writes the listed formats (the first as {kind}_lora.safetensors); `export ITEM --format`
    converts a one-file fit's LoRA into another format, tensors unchanged; a bad format is one line."""
    from jobs.cli import main as unziplora
    from unziplora.export import lora_format

    common = ["--content", "sks dog", "--style", "ink", "--steps", "2", "--rank", "2", "--recalibrations", "1",
              "--quiet"]
    assert main(["fit", str(sample_image), "--out", str(tmp_path / "one"), *common]) == 0
    assert sorted(p.name for p in (tmp_path / "one").glob("*_lora*")) == [FILES["content"], FILES["style"]]
    assert main(["fit", str(sample_image), "--out", str(tmp_path / "two"), "--formats", "diffusers,kohya", *common]) == 0
    assert lora_format(tmp_path / "two" / FILES["style"]) == "diffusers"
    assert lora_format(tmp_path / "two" / "style_lora_kohya.safetensors") == "kohya"
    capsys.readouterr()
    assert unziplora(["export", str(tmp_path / "one"), "--format", "diffusers", "--kind", "style"]) == 0
    [written] = json.loads(capsys.readouterr().out)["files"]
    assert written == str(tmp_path / "one" / "style_lora_diffusers.safetensors")
    assert lora_format(written) == "diffusers"
    fit_ = load_fit(tmp_path / "one")
    from safetensors.torch import load_file
    converted = {k.removeprefix("unet."): v for k, v in load_file(written).items()}
    assert converted.keys() == fit_.lora_state_dict("style").keys()
    assert all(torch.equal(converted[k], v) for k, v in fit_.lora_state_dict("style").items())
    assert main(["fit", str(sample_image), "--out", str(tmp_path / "bad"), "--formats", "ckpt", *common]) == 2
    assert "LoRA formats must be one or more of" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # a job refuses them before anything starts (no Ray, no lease, no library)
    assert unziplora(["decompose", "--input", str(tmp_path), "--output", str(tmp_path / "lib"), "--formats",
                      "kohya,ckpt", "--no-tracking", "--quiet"]) == 2
    assert "LoRA formats must be one or more of" in capsys.readouterr().err and not (tmp_path / "lib").exists()
