"""Where a base model's weights are, what kind of model they hold, and which exact weights they are.

A base-model spec is one of:
  preset        tiny | sdxl-random                 built offline from config (random weights, fixed seed)
  packaged      toy                                trained weights shipped as package data
  directory     /models/sdxl                       a diffusers StableDiffusionXLPipeline folder
  single file   /models/juggernautXL.safetensors   an A1111 / ComfyUI checkpoint (diffusers' from_single_file)
  hub id        org/name (revision: org/name@rev)  resolved by huggingface_hub: its cache, HF_HUB_OFFLINE, HF_TOKEN

`locate_base_model` tells which, refuses anything that is not an SDXL base model in one line (from the
files alone, before any weights are loaded) and finds the files. Its `fingerprint` names the exact weights:
the snapshot commit of a hub model, a content hash of local files (cached by path, size and mtime), so item
ids change when the weights do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .errors import BaseModelError

PRESETS = ("tiny", "sdxl-random")


class Packaged(NamedTuple):
    """A trained preset shipped as package data. Located with importlib's finder, so unziplora never imports
    the package (the toy world lives in `toyworld/`)."""

    package: str
    folder: str  # inside the package
    role_table: str
    guidance: float  # the classifier-free guidance its samples are judged best at
    preview_subjects: tuple[str, ...]  # what previews draw a style LoRA on: subjects the model knows
    preview_styles: tuple[str, ...]  # and a content LoRA in


# toy: the guidance its samples are judged best at (the sweep is in docs/toy-world.md)
PACKAGED = {"toy": Packaged("toyworld", "weights/toy-sdxl", "toy", guidance=2.0,
                            preview_subjects=("circle", "square", "triangle", "star", "cross", "heart"),
                            preview_styles=("flat", "striped", "dotted", "outlined", "checkered", "noisy watercolor"))}

HUB_ID_PATTERN = r"[A-Za-z0-9][\w.-]*/[\w.-]+"  # org/name, as the Hub spells repository ids
HUB_ID = re.compile(f"^{HUB_ID_PATTERN}$")
SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class BaseLocation:
    kind: str  # preset | packaged | directory | single-file | hub
    spec: str  # the name, path or hub id as given (without @revision)
    path: Path | None = None  # the folder or file to load (hub: the snapshot folder in the cache)
    revision: str | None = None  # hub: the snapshot's commit
    variant: str | None = None
    config: Path | None = None  # single file: the diffusers config folder it is read with (None: SDXL-base's)
    fingerprint: str = ""


def locate_base_model(spec: str, *, revision: str | None = None, variant: str | None = None,
                      config: str | None = None, fetch: bool = True) -> BaseLocation:
    """`fetch=False`: for a hub id, only its model_index.json (enough for the kind and the commit)."""
    if spec in PRESETS:
        return BaseLocation("preset", spec, fingerprint=f"preset:{spec}")
    if spec in PACKAGED:
        folder = packaged_dir(spec)
        return BaseLocation("packaged", spec, folder, fingerprint=_tree_fingerprint(folder, None))
    path = Path(spec).expanduser()
    if path.is_dir():
        check_pipeline_folder(path, spec)
        return BaseLocation("directory", spec, path, variant=variant, fingerprint=_tree_fingerprint(path, variant))
    if path.is_file():
        return _locate_single_file(path, spec, config)
    if HUB_ID.match(spec):
        return _locate_hub(spec, revision, variant, fetch)
    raise BaseModelError(f"base model {spec!r}: no such file or folder, and not a preset "
                         f"({', '.join(PRESETS + tuple(PACKAGED))}) or a hub id (org/name)")


def packaged_dir(name: str) -> Path:
    import importlib.util

    package, sub = PACKAGED[name].package, PACKAGED[name].folder
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / sub if spec and spec.submodule_search_locations else None
    if path is None or not (path / "model_index.json").is_file():
        raise BaseModelError(f"the {name!r} base model is not installed ({package}/{sub}); "
                             f"train it with `python -m toyworld.train_base` and copy its pipeline/ there")
    return path


# ---- diffusers folders (local or a hub snapshot) ----

# What model_index.json's class says about a folder that is not an SDXL base pipeline
OTHER_PIPELINES = {
    "StableDiffusionPipeline": "a Stable Diffusion 1.x/2.x pipeline",
    "StableDiffusionXLImg2ImgPipeline": "an SDXL img2img/refiner pipeline (fit on the SDXL base model)",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting pipeline",
    "StableDiffusion3Pipeline": "a Stable Diffusion 3 pipeline",
    "FluxPipeline": "a FLUX pipeline",
}


def check_pipeline_folder(folder: Path, spec: str) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        lora = any(folder.glob("*lora*.safetensors"))
        raise BaseModelError(f"{spec} is not a diffusers pipeline (no model_index.json)" +
                             (": it holds a LoRA, which is not a base model" if lora else ""))
    try:
        cls_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"{spec}: model_index.json cannot be read: {exc}") from exc
    if cls_name != "StableDiffusionXLPipeline":
        what = OTHER_PIPELINES.get(cls_name, f"a {cls_name or 'unknown'} pipeline")
        raise BaseModelError(f"{spec} holds {what}, not an SDXL base pipeline (StableDiffusionXLPipeline)")


def weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The files diffusers reads from a pipeline folder for this variant: model_index.json, and in each
    component's folder its configs and tokenizer files plus the torch weights of the variant (safetensors
    where there are any; other variants, ONNX, Flax and OpenVINO files are not read, so not hashed)."""
    components = [name for name, value in json.loads((folder / "model_index.json").read_text()).items()
                  if isinstance(value, list) and value[0] is not None]
    files = [folder / "model_index.json"]
    for name in components:
        sub = folder / name
        if not sub.is_dir():
            continue
        present = sorted(p for p in sub.iterdir() if p.is_file())
        files += [p for p in present if p.suffix in (".json", ".txt", ".model") and not p.name.startswith(".")]
        weights = [p for p in present if p.suffix in (".safetensors", ".bin") and not p.name.startswith(
            ("openvino", "."))]
        mine = [p for p in weights if _variant_of(p) == variant] or weights
        safe = [p for p in mine if p.suffix == ".safetensors"]
        files += safe or mine
    return files


def _variant_of(path: Path) -> str | None:
    """`diffusion_pytorch_model.fp16.safetensors` -> fp16; shards `model.fp16-00001-of-00002` too."""
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", path.stem)
    parts = stem.split(".", 1)
    return parts[1] if len(parts) > 1 else None


def _tree_fingerprint(folder: Path, variant: str | None) -> str:
    digest = hashlib.sha256()
    for path in weight_files(folder, variant):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return "sha256-tree:" + digest.hexdigest()


# ---- single-file checkpoints ----

def _locate_single_file(path: Path, spec: str, config: str | None) -> BaseLocation:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BaseModelError(f"{spec} is a pickle checkpoint, which can run code when loaded: convert it to "
                             f".safetensors first")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise BaseModelError(f"{spec} is neither a diffusers folder nor a .safetensors checkpoint")
    check_single_file(path)
    config_path, fingerprint = None, "sha256:" + file_sha256(path)
    if config is not None:
        config_path = Path(config).expanduser()
        check_pipeline_folder(config_path, config)
        fingerprint += "+config:" + _tree_fingerprint(config_path, None).split(":", 1)[1]
    return BaseLocation("single-file", spec, path, config=config_path, fingerprint=fingerprint)


# key prefixes of an SDXL base checkpoint as A1111, ComfyUI and sd-scripts save it
SDXL_PARTS = {
    "UNet": "model.diffusion_model.",
    "VAE": "first_stage_model.",
    "CLIP-L text encoder": "conditioner.embedders.0.transformer.",
    "OpenCLIP-G text encoder": "conditioner.embedders.1.model.",
}
LORA_KEY = re.compile(r"(^lora_(unet|te\d?)_)|(\.lora_(down|up|A|B)\.)|(\.(hada|lokr)_)|(\.alpha$)")
# diffusers' name for a checkpoint's model type (infer_diffusers_model_type) -> what we tell the user
MODEL_TYPES = {"v1": "a Stable Diffusion 1.x checkpoint", "v2": "a Stable Diffusion 2.x checkpoint",
               "xl_refiner": "the SDXL refiner (fit on the SDXL base model)",
               "xl_inpaint": "an SDXL inpainting checkpoint", "playground-v2-5": "a Playground v2.5 checkpoint",
               "sd3": "a Stable Diffusion 3 checkpoint", "flux": "a FLUX checkpoint", "controlnet": "a ControlNet",
               "upscale": "an upscaler"}


def check_single_file(path: Path) -> None:
    """Refuse, from the safetensors header alone, what is not a whole SDXL base checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:  # not a safetensors file at all, or a truncated one
        raise BaseModelError(f"{path} cannot be read as a safetensors checkpoint: {exc}") from exc
    if any(LORA_KEY.search(k) for k in shapes) or "ss_network_module" in metadata:
        raise BaseModelError(f"{path} is a LoRA, not a base model: pass the SDXL checkpoint it was trained on")
    if "edm_mean" in shapes:
        raise BaseModelError(f"{path} is {MODEL_TYPES['playground-v2-5']}, not an SDXL base checkpoint")
    missing = [part for part, prefix in SDXL_PARTS.items() if not any(k.startswith(prefix) for k in shapes)]
    if not any(k.startswith(SDXL_PARTS["UNet"]) for k in shapes) or \
            not any(k.startswith(SDXL_PARTS["OpenCLIP-G text encoder"]) for k in shapes):
        raise BaseModelError(f"{path} is {_model_type(shapes)}, not an SDXL base checkpoint")
    if missing:
        raise BaseModelError(f"{path} lacks the {' and the '.join(missing)} of an SDXL checkpoint (a UNet-only "
                             f"file?): use a full checkpoint or a diffusers folder")
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", (0, 4))
    if conv_in[1] != 4:
        raise BaseModelError(f"{path} is {MODEL_TYPES['xl_inpaint']} ({conv_in[1]} input channels), not an SDXL "
                             f"base checkpoint")


def _model_type(shapes: dict[str, tuple]) -> str:
    """What diffusers' own detector calls these keys, for the error message."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    try:
        kind = infer_diffusers_model_type({k: SimpleNamespace(shape=v) for k, v in shapes.items()})
    except Exception:  # the detector may look at more than shapes; the message can do without it
        kind = None
    if kind == "v1" and CHECKPOINT_KEY_NAMES["v1"] not in shapes:  # v1 is diffusers' fallback, not a finding
        kind = None
    for prefix, text in MODEL_TYPES.items():
        if kind and kind.startswith(prefix):
            return text
    return f"a {kind} checkpoint" if kind else "not a checkpoint diffusers recognises"


# ---- hub ids ----

def _locate_hub(repo_id: str, revision: str | None, variant: str | None, fetch: bool) -> BaseLocation:
    """The snapshot folder huggingface_hub keeps (downloaded now unless cached; offline: the cache only)."""
    from diffusers import DiffusionPipeline  # imported before _quiet: diffusers sets its log level on import
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        with _quiet("diffusers", "huggingface_hub"):  # both warn before they fall back to the cache
            # model_index.json first: a wrong kind of repository is refused before gigabytes are fetched
            index = Path(hf_hub_download(repo_id, "model_index.json", revision=revision))
            check_pipeline_folder(index.parent, at)
            commit = index.parent.name  # huggingface_hub keeps each snapshot at .../snapshots/<commit>
            folder = Path(DiffusionPipeline.download(repo_id, revision=commit, variant=variant)) if fetch \
                else index.parent
    except BaseModelError:
        raise
    except LocalEntryNotFoundError as exc:
        _check_cached_snapshot(repo_id, revision, at)  # cached without model_index.json: say what it holds
        if constants.HF_HUB_OFFLINE:
            raise BaseModelError(f"base model {at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                                 f"and HF_HUB_OFFLINE is set: download it first (`hf download {repo_id}`), or "
                                 f"pass a local folder") from exc
        raise BaseModelError(f"base model {at}: the Hugging Face Hub cannot be reached and the model is not "
                             f"in the cache ({constants.HF_HUB_CACHE})") from exc
    except GatedRepoError as exc:
        raise BaseModelError(f"base model {repo_id} is gated: accept its licence on the Hub and set HF_TOKEN") \
            from exc
    except RepositoryNotFoundError as exc:
        raise BaseModelError(f"base model {repo_id}: no such repository on the Hugging Face Hub (or it is "
                             f"private: set HF_TOKEN), and no such local folder") from exc
    except RevisionNotFoundError as exc:
        raise BaseModelError(f"base model {repo_id} has no revision {revision!r}") from exc
    except EntryNotFoundError as exc:
        raise BaseModelError(f"hub repository {at} is not a diffusers pipeline (no model_index.json): for a "
                             f"single-file checkpoint, download the file and pass its path") from exc
    except OSError as exc:  # diffusers wraps what it cannot fetch in OSError: keep its first line
        raise BaseModelError(f"base model {at}: {str(exc).splitlines()[0]}") from exc
    # the commit names the exact weights
    return BaseLocation("hub", repo_id, folder, revision=commit, variant=variant,
                        fingerprint=f"hub:{repo_id}@{commit}")


def _check_cached_snapshot(repo_id: str, revision: str | None, at: str) -> None:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached at all: the caller says so
        return
    check_pipeline_folder(folder, at)


class _quiet:
    """Silence libraries' loggers below ERROR for a block."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(name) for name in names]

    def __enter__(self):
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for logger, level in zip(self.loggers, self.levels):
            logger.setLevel(level)


# ---- content hashes, cached by (path, size, mtime) ----

def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered in a small JSON cache so a 7 GB checkpoint is hashed once per machine."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = _hash_cache_path()
    known = _read_json(cache)
    if key in known:
        return known[key]
    if stat.st_size > 1 << 30:  # seconds per GB: say why we wait
        print(f"hashing {path} ({stat.st_size / 1e9:.1f} GB) once, to name its weights in item ids",
              file=sys.stderr)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    known = _read_json(cache) | {key: digest.hexdigest()}  # re-read: another process may have added some
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(f".{cache.name}.{uuid.uuid4().hex[:8]}")
        temporary.write_text(json.dumps(known))
        os.replace(temporary, cache)  # atomic: concurrent writers lose at worst an entry, recomputed later
    except OSError:  # a read-only home: hash again next time
        pass
    return known[key]


def cache_root() -> Path:
    """This user's cache folder for unziplora (file hashes, the bundled SDXL config)."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "unziplora"


def _hash_cache_path() -> Path:
    return cache_root() / "file-sha256.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
