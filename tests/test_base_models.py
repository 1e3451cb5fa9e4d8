"""Every kind of base model a user has, offline: a diffusers folder, a single-file checkpoint, a hub id through a
hub cache laid out as huggingface_hub writes it (HF_HUB_OFFLINE=1), through `unziplora fit` and `decompose`;
one clear line for every wrong kind; and a fingerprint of the weights in every item id.

The hub tests run the CLI in fresh processes: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at
import, exactly as it does for a user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from checkpoints import copy_without_weights, write_hub_cache, write_single_file, write_wrong_kind
from pipeline.store import layout
from pipeline.run.identify import identify
from pipeline.store.manifest import read_manifest
from pipeline.run.spec import JobSpec, Previews, RunState, Tracking
from unziplora import BaseModelError, load_base_model
from unziplora.fit_files import CONFIG, RECORD
from unziplora.locate import locate_base_model, packaged_dir
from unziplora.models import sdxl_config_dir

REPO = Path(__file__).resolve().parent.parent
COMMIT, COMMIT_2 = "0123456789abcdef0123456789abcdef01234567", "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """File hashes and the bundled SDXL config go to a cache of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and len(text) < 500, text  # one line, though it names a long temporary path
    return text


# ---- wrong kinds: one clear line each, decided from the files alone ----

def _pipeline_folder(path: Path, cls: str) -> str:
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    return str(path)


WRONG_FOLDERS = {
    "StableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "FLUX",
    "StableDiffusionXLImg2ImgPipeline": "refiner",
}


@pytest.mark.parametrize("cls", sorted(WRONG_FOLDERS))
def test_a_folder_of_another_pipeline_is_refused(tmp_path, cls):
    with pytest.raises(BaseModelError) as exc:
        load_base_model(_pipeline_folder(tmp_path / "model", cls))
    assert WRONG_FOLDERS[cls] in one_line(exc) and "not an SDXL base pipeline" in str(exc.value)


def test_missing_and_empty_and_lora_folders_are_refused(tmp_path):
    with pytest.raises(BaseModelError) as exc:
        load_base_model(str(tmp_path / "nope"))
    assert "no such file or folder" in one_line(exc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError) as exc:
        load_base_model(str(tmp_path / "empty"))
    assert "no model_index.json" in one_line(exc)
    (tmp_path / "lora").mkdir()
    write_wrong_kind(tmp_path / "lora" / "pytorch_lora_weights.safetensors", "lora-diffusers")
    with pytest.raises(BaseModelError) as exc:
        load_base_model(str(tmp_path / "lora"))
    assert "LoRA" in one_line(exc)


WRONG_FILES = {
    "sd15": "Stable Diffusion 1.x", "sd3": "Stable Diffusion 3", "flux": "FLUX", "refiner": "refiner",
    "lora-kohya": "is a LoRA, not a base model", "lora-diffusers": "is a LoRA, not a base model",
    "unet-only": "lacks the VAE and the CLIP-L text encoder", "not-a-model": "not an SDXL base checkpoint",
}


@pytest.mark.parametrize("kind", sorted(WRONG_FILES))
def test_a_single_file_of_another_kind_is_refused(tmp_path, kind):
    path = write_wrong_kind(tmp_path / f"{kind}.safetensors", kind)
    with pytest.raises(BaseModelError) as exc:
        load_base_model(str(path))
    assert WRONG_FILES[kind] in one_line(exc), str(exc.value)


def test_pickles_and_other_files_are_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(BaseModelError) as exc:
        load_base_model(str(tmp_path / "model.ckpt"))
    assert "pickle" in one_line(exc) and ".safetensors" in str(exc.value)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(BaseModelError) as exc:
        load_base_model(str(tmp_path / "broken.safetensors"))
    assert "cannot be read as a safetensors checkpoint" in one_line(exc)


# ---- local folders and single files ----

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """The tiny preset saved three ways: a diffusers folder, its configs alone, one A1111-style file."""
    from unziplora.models import build_preset

    root = tmp_path_factory.mktemp("tiny-files")
    base = build_preset("tiny")
    base.pipeline().save_pretrained(root / "folder")
    copy_without_weights(root / "folder", root / "config")
    write_single_file(base, root / "tiny-xl.safetensors", dtype=torch.float32)
    return base, root


def test_a_diffusers_folder_loads_exactly_and_is_fingerprinted(tiny_files, tmp_path, capfd):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    reference, root = tiny_files
    capfd.readouterr()
    StableDiffusionXLPipeline.from_pretrained(str(root / "folder"), local_files_only=True)
    assert "Loading pipeline components" in capfd.readouterr().err  # what diffusers alone prints
    base = load_base_model(str(root / "folder"), device="cpu")
    assert "Loading" not in capfd.readouterr().err  # not one bar per worker in a job's log
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
    assert base.location.kind == "directory" and base.default_resolution == reference.default_resolution
    for a, b in zip(base.unet.parameters(), reference.unet.parameters()):
        assert torch.equal(a, b)
    assert base.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert base.fingerprint.startswith("sha256-tree:")
    # a folder fine-tuned in place is other weights: another fingerprint
    copy = shutil.copytree(root / "folder", tmp_path / "tuned")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    assert locate_base_model(str(copy)).fingerprint == base.fingerprint  # same bytes, same name
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    tensors["conv_in.bias"] = tensors["conv_in.bias"] + 1
    save_file(tensors, weights)
    assert locate_base_model(str(copy)).fingerprint != base.fingerprint
    weights.write_bytes(b"broken")
    with pytest.raises(BaseModelError) as exc:
        load_base_model(str(copy), device="cpu")
    assert "cannot load SDXL base model" in one_line(exc)


def test_a_single_file_checkpoint_loads_exactly(tiny_files):
    """An A1111/ComfyUI-layout file goes through diffusers' from_single_file (with the folder of configs it
    belongs to) and gives back every weight of every component."""
    reference, root = tiny_files
    path = root / "tiny-xl.safetensors"
    base = load_base_model(str(path), config=str(root / "config"), device="cpu")
    assert base.location.kind == "single-file" and base.fingerprint.startswith("sha256:")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(base, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert base.tokenizer_2("a cat", padding="max_length").input_ids[4] == 0  # the config's tokenizer
    # the hash is remembered: the second look costs a stat, not a read
    cache = json.loads((Path(os.environ["XDG_CACHE_HOME"]) / "unziplora" / "file-sha256.json").read_text())
    assert any(key.startswith(str(path.resolve())) for key in cache)
    # without the tiny configs, the file is read as SDXL-base: the shapes do not fit, and it says so
    with pytest.raises(BaseModelError) as exc:
        load_base_model(str(path), device="cpu")
    assert "cannot load the single-file checkpoint" in one_line(exc)


def test_the_bundled_config_is_sdxl_base():
    """What a real single-file SDXL is read with, offline: SDXL-base 1.0's published architecture."""
    folder = sdxl_config_dir()
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == 2048 and unet["transformer_layers_per_block"] == [1, 2, 10]
    assert unet["addition_embed_type"] == "text_time" and unet["projection_class_embeddings_input_dim"] == 2816
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.13025 and vae["block_out_channels"] == [128, 256, 512, 512]
    te2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    assert (te2["hidden_size"], te2["num_hidden_layers"], te2["projection_dim"]) == (1280, 32, 1280)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert sdxl_config_dir() == folder  # written once


def test_single_file_fit_through_the_cli(tiny_files, sample_image, tmp_path):
    from jobs.cli import main

    _, root = tiny_files
    out = tmp_path / "fit"
    assert main(["fit", str(sample_image), "--content", "sks dog", "--style", "ink", "--steps", "3", "--rank", "2",
                 "--base-model", str(root / "tiny-xl.safetensors"), "--base-config", str(root / "config"),
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    record = json.loads((out / RECORD).read_text())
    assert record["base_model_fingerprint"].startswith("sha256:")
    assert yaml.safe_load((out / CONFIG).read_text())["base_config"] == str(root / "config")
    assert main(["generate", str(out), "--out", str(tmp_path / "x.png"), "--steps", "2", "--device", "cpu"]) == 0


def test_item_ids_hold_the_fingerprint(tmp_path):
    """The same image with the same settings on other weights (another commit, a folder tuned in place) is
    another item."""
    (tmp_path / "a.png").write_bytes(b"not even an image: identify only hashes it")
    item = {"source_uri": str(tmp_path / "a.png"), "content": "sks dog", "style": "ink", "overrides": "{}"}
    ids = [identify(item, JobSpec(input="", output="", state=RunState(base_fingerprint=fp)))[0]
           for fp in ("sha256:aa", "sha256:aa", "sha256:bb")]
    assert ids[0]["item_id"] == ids[1]["item_id"] != ids[2]["item_id"]
    assert ids[0]["legacy_item_id"] == ids[2]["legacy_item_id"]  # what a schema-2 library called it


# ---- hub ids, offline, in fresh processes ----

@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """test-org/toy-sdxl: the packaged toy pipeline at two commits (refs main and v2); test-org/toy-sdxl-fp16:
    the same weights named as an fp16 variant; test-org/sd15: a pipeline of another kind; test-org/lora: a
    LoRA repository."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    toy = packaged_dir("toy")
    write_hub_cache(cache, "test-org/toy-sdxl", toy, COMMIT)
    write_hub_cache(cache, "test-org/toy-sdxl", toy, COMMIT_2, refs=("v2",))
    fp16 = tmp_path_factory.mktemp("fp16") / "toy"
    shutil.copytree(toy, fp16)
    for weights in fp16.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    write_hub_cache(cache, "test-org/toy-sdxl-fp16", fp16, COMMIT)
    sd15 = tmp_path_factory.mktemp("sd15") / "sd15"
    _pipeline_folder(sd15, "StableDiffusionPipeline")
    write_hub_cache(cache, "test-org/sd15", sd15, COMMIT)
    lora = tmp_path_factory.mktemp("lora")
    write_wrong_kind(lora / "pytorch_lora_weights.safetensors", "lora-diffusers")
    write_hub_cache(cache, "test-org/lora", lora, COMMIT)
    return cache


def offline_env(hub_cache: Path, tmp_path: Path) -> dict:
    return dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "xdg"),
                HF_HOME=str(tmp_path / "hf-home"), RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))


def unziplora(args: list[str], env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_hub_ids_fit_offline_through_the_cli(hub_cache, sample_image, tmp_path):
    env = offline_env(hub_cache, tmp_path)
    common = ["--content", "sks shape", "--style", "zwx", "--steps", "3", "--rank", "2", "--quiet",
              "--threads", "1", "--device", "cpu"]
    # main is what `decompose` below resolves; here a tag and a variant (--revision is parsed like @rev: test_cli)
    runs = {"at": (["--base-model", "test-org/toy-sdxl@v2"], COMMIT_2),
            "fp16": (["--base-model", "test-org/toy-sdxl-fp16", "--variant", "fp16"], COMMIT)}
    for name, (flags, commit) in runs.items():
        done = unziplora(["fit", str(sample_image), *common, *flags, "--out", str(tmp_path / name)], env)
        assert done.returncode == 0, done.stderr[-2000:]
        saved = yaml.safe_load((tmp_path / name / CONFIG).read_text())
        assert saved["revision"] == commit  # the saved settings name the exact snapshot: a rerun gets it
        repo = flags[1].split("@")[0]
        assert json.loads((tmp_path / name / RECORD).read_text())["base_model_fingerprint"] == \
            f"hub:{repo}@{commit}"


@pytest.mark.parametrize("spec, says", [
    ("test-org/missing", "not in the Hugging Face cache"),
    ("test-org/toy-sdxl@no-such-tag", "not in the Hugging Face cache"),
    ("test-org/sd15", "Stable Diffusion 1.x/2.x"),
    ("test-org/lora", "not a diffusers pipeline (no model_index.json)"),
])
def test_hub_ids_that_cannot_be_used_are_one_line(hub_cache, tmp_path, spec, says):
    """In-process is enough here: what matters is the message, and HF_HUB_OFFLINE is read at import, so the
    cache is set with huggingface_hub's own constants."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(BaseModelError) as exc:
            locate_base_model(*spec.split("@")[:1], revision=(spec.split("@") + [None])[1])
    assert says in one_line(exc), str(exc.value)


def test_decompose_with_a_hub_id_offline(hub_cache, tmp_path):
    """`decompose` through the hub cache: the driver pins main to its commit, the workers load that snapshot,
    rows name the fingerprint (when main moves to another commit, the ids change: test_item_ids_hold_...)."""
    from pipeline_fixtures import png_bytes

    (tmp_path / "in").mkdir()
    for i in range(2):
        (tmp_path / "in" / f"img{i}.png").write_bytes(png_bytes(40 + i, 40, 40))
    env = offline_env(hub_cache, tmp_path)
    job = ["decompose", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "lib"),
           "--default-content", "sks shape", "--default-style", "zwx", "--base-model", "test-org/toy-sdxl",
           "--steps", "3", "--rank", "2", "--workers", "1", "--no-tracking", "--preview-steps", "0", "--quiet"]
    done = unziplora(job, env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["ok"] == 2 and report["fits_this_run"] == 2, report
    rows = read_manifest(str(tmp_path / "lib")).to_pylist()
    assert {r["base_model_fingerprint"] for r in rows} == {f"hub:test-org/toy-sdxl@{COMMIT}"}
    assert {r["base_model"] for r in rows} == {"test-org/toy-sdxl"}
    for row in rows:  # each fit's saved settings name the commit the driver pinned
        files = json.loads(row["files"])
        assert yaml.safe_load(Path(files[CONFIG]["uri"]).read_text())["revision"] == COMMIT


def test_a_worker_whose_weights_differ_from_the_plan_fails_its_items(tmp_path):
    """The driver named the weights in the item ids; a worker that loads other weights under that name (another
    node's copy of a folder, say) must not fit under those ids."""
    from pipeline.run.worker import FitWorker
    from pipeline_fixtures import png_bytes

    (tmp_path / "a.png").write_bytes(png_bytes(3, 40, 40))
    job = JobSpec(input=str(tmp_path), output=str(tmp_path / "lib"), fit={"steps": 3, "rank": 2},
                  tracking=Tracking(enabled=False), previews=Previews(steps=0),
                  state=RunState(base_fingerprint="sha256-tree:" + "0" * 64))
    row = FitWorker(job, device="cpu").process({"source_uri": str(tmp_path / "a.png"), "content": "sks dog",
                                                 "style": "ink", "overrides": "{}", "prompt_error": None})
    assert row["status"] == "failed" and "not the one the job planned with" in row["error"], row
    assert "preset:tiny" in row["error"] and not (tmp_path / "lib" / layout.ITEMS).exists()
