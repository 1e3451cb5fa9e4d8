"""Base-model files as users have them, written offline from the tiny preset: a single-file SDXL checkpoint in
the layout A1111/ComfyUI/sd-scripts save (the "ldm" key names), a Hugging Face hub cache laid out as
huggingface_hub writes it, and header-faithful stand-ins of the wrong kinds of file (SD 1.5, SD3, FLUX, the
refiner, LoRAs). Plain module, imported by the tests that need them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

# ---------------------------------------------------------------------------------------------------------
# diffusers SDXL -> one .safetensors in the original (ldm) key layout

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_key_to_ldm(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """One diffusers UNet2DConditionModel key -> its name under `model.diffusion_model.`."""
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    per_down, per_up = layers_per_block + 1, layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        index = 1 + int(m[1]) * per_down + int(m[3])
        return _block(f"input_blocks.{index}", m[2], m[4])
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{1 + int(m[1]) * per_down + layers_per_block}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        index = 1 if m[1] == "attentions" else 2 * int(m[2])  # resnet, attention, resnet
        return _block("middle_block", m[1], m[3], slot=index)
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        return _block(f"output_blocks.{int(m[1]) * per_up + int(m[3])}", m[2], m[4])
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        block = int(m[1])
        slot = 2 if up_has_attention[block] else 1
        return f"output_blocks.{block * per_up + layers_per_block}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def _block(prefix: str, kind: str, rest: str, slot: int | None = None) -> str:
    """ldm's blocks are sequences: (resnet, attention) in input/output blocks, (resnet, attention, resnet) in
    the middle one."""
    if kind == "resnets":
        for new, old in _RESNET:
            rest = re.sub(rf"^{new}\.", old + ".", rest)
    if slot is None:
        slot = 1 if kind == "attentions" else 0
    return f"{prefix}.{slot}.{rest}"


def vae_key_to_ldm(key: str, value: torch.Tensor, up_blocks: int) -> tuple[str, torch.Tensor]:
    key = key.replace("conv_norm_out", "norm_out")
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", key)
    if m:
        name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
        if m[2] != "group_norm" and value.ndim == 2:
            value = value[:, :, None, None]  # ldm keeps these as 1x1 convolutions
        return f"{m[1]}.mid.attn_1.{name}.{m[3]}", value
    key = re.sub(r"mid_block\.resnets\.(\d+)", lambda g: f"mid.block_{int(g[1]) + 1}", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda g: f"decoder.up.{up_blocks - 1 - int(g[1])}.block", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                 lambda g: f"decoder.up.{up_blocks - 1 - int(g[1])}.upsample", key)
    return key.replace("conv_shortcut", "nin_shortcut"), value


def _text_model(key: str) -> str:
    """transformers 5 flattened CLIPTextModel (`embeddings.*`); checkpoints keep transformers 4's `text_model.*`."""
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def open_clip_state(te2: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP's names (fused q/k/v, text_projection transposed)."""
    sd, out = {_text_model(k): v for k, v in te2.state_dict().items()}, {}
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    for n in range(te2.config.num_hidden_layers):
        layer, block = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for part in ("weight", "bias"):
            out[block + f"attn.in_proj_{part}"] = torch.cat(
                [sd[layer + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[block + f"attn.out_proj.{part}"] = sd[layer + f"self_attn.out_proj.{part}"]
            out[block + f"ln_1.{part}"] = sd[layer + f"layer_norm1.{part}"]
            out[block + f"ln_2.{part}"] = sd[layer + f"layer_norm2.{part}"]
            out[block + f"mlp.c_fc.{part}"] = sd[layer + f"mlp.fc1.{part}"]
            out[block + f"mlp.c_proj.{part}"] = sd[layer + f"mlp.fc2.{part}"]
    return out


def write_single_file(base, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """A whole SDXL pipeline (UNet, VAE, both text encoders) as one A1111-style .safetensors."""
    unet_cfg = base.unet.config
    up_attention = ["CrossAttn" in t for t in unet_cfg.up_block_types]
    state = {}
    for key, value in base.unet.state_dict().items():
        state["model.diffusion_model." + unet_key_to_ldm(key, unet_cfg.layers_per_block, up_attention)] = value
    up_blocks = len(base.vae.config.up_block_types)
    for key, value in base.vae.state_dict().items():
        ldm_key, ldm_value = vae_key_to_ldm(key, value, up_blocks)
        state["first_stage_model." + ldm_key] = ldm_value
    for key, value in base.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):  # real files name CLIP-L's weights text_model.* (transformers 4)
            state["conditioner.embedders.0.transformer." + _text_model(key)] = value
    for key, value in open_clip_state(base.text_encoder_2).items():
        state["conditioner.embedders.1.model." + key] = value
    save_file({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, str(path),
              metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    return path


# ---------------------------------------------------------------------------------------------------------
# A Hugging Face hub cache, as huggingface_hub lays it out

def write_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """`folder`'s files as snapshot `commit` of `repo_id`: models--org--name/{blobs,refs,snapshots}, each
    snapshot file a relative symlink to its blob (named by its sha256, as huggingface_hub names LFS blobs)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for source in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target = snapshot / source.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


# ---------------------------------------------------------------------------------------------------------
# The wrong kinds of file, with the key names (and the shapes diffusers looks at) of the real ones

def _small(shape=(4, 4)) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float16)


def write_wrong_kind(path: Path, kind: str) -> Path:
    keys: dict[str, tuple] = {}
    if kind == "sd15":
        keys = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
                "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
                "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)}
    elif kind == "sd3":
        keys = {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
                "model.diffusion_model.pos_embed": (1, 36864, 1),  # (1, 36864, 1536) in the real file
                "model.diffusion_model.x_embedder.proj.weight": (1536, 16, 2, 2),
                "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
    elif kind == "flux":
        keys = {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (128,),
                "model.diffusion_model.guidance_in.in_layer.bias": (3072,),
                "model.diffusion_model.img_in.weight": (3072, 64)}
    elif kind == "refiner":
        keys = {"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
                "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
                "conditioner.embedders.0.model.text_projection": (1280, 1280),
                "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
    elif kind == "lora-kohya":
        keys = {"lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 320),
                "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": (320, 4),
                "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": ()}
    elif kind == "lora-diffusers":
        keys = {"unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 320),
                "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": (320, 4)}
    elif kind == "unet-only":
        keys = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                "conditioner.embedders.1.model.positional_embedding": (77, 1280)}
    elif kind == "not-a-model":
        keys = {"weight": (3, 3)}
    else:
        raise ValueError(kind)
    save_file({k: _small(shape) if shape else torch.tensor(4.0, dtype=torch.float16) for k, shape in keys.items()},
              str(path))
    return path


def copy_without_weights(folder: Path, dest: Path) -> Path:
    """A diffusers folder's configs and tokenizers only: the config a single-file checkpoint is read with."""
    shutil.copytree(folder, dest, ignore=lambda _, names: [n for n in names if n.endswith((".safetensors", ".bin"))])
    return dest


def json_file(path: Path) -> dict:
    return json.loads(path.read_text())
