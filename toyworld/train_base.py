"""Train the toy mini-SDXL on the toy world, on CPU: `python -m toyworld.train_base --out DIR`.

The result is a diffusers `StableDiffusionXLPipeline` directory (fp16 safetensors) with SDXL's components
and names: a VAE, a UNet with down/mid/up cross-attention blocks and `text_time` added conditioning, two
CLIP text encoders with the real CLIP tokenizers, and SDXL's noise schedule.

Design (why):
- VAE with ONE block (no downsampling, vae_scale_factor 1): 3 -> 4 channels per pixel loses nothing by
  design, so only the (16-channel) convolutions have to learn it; the UNet then works on 32x32 latents,
  the size TOYWORLD.md measured as trainable in an hour or two. Stage 1 trains it and records PSNR and the
  judges' accuracy on its reconstructions (what matters downstream).
- Text encoders: random init; frozen by default (every prompt encoded once; rounded to fp16 first, so the
  committed weights give the very embeddings the UNet saw), or with `--train-text-encoders` trained
  together with the UNet, like the learned token embeddings of TOYWORLD.md's working model: with frozen
  random encoders the UNet learned to ignore the prompt (measured, see settings.json notes / issue 6).
  Either way they are frozen during LoRA fits, as SDXL's are.
- Classifier-free guidance: 10 % of samples unconditional, half as zeros (what StableDiffusionXLPipeline
  uses for an absent negative prompt) and half as the encoded empty prompt (what `unziplora generate` uses).
- EMA of the UNet weights is what gets saved (standard for diffusion; much cleaner samples early on).

Checkpoints (the pipeline directory, `state.pt` to resume, `loss.csv`, `settings.json`) are rewritten every
`save_every` steps, so a killed run keeps its progress; `--resume` continues from `state.pt`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toyworld import world
from unziplora.training import prediction_target

# ---- the architecture, as data ----

TEXT_HIDDEN = 32  # per encoder; cross-attention width = 2 x this (SDXL concatenates the two)
MODEL_CONFIG = dict(
    unet=dict(
        sample_size=world.RESOLUTION, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128), layers_per_block=1, transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(1, 2, 4),  # diffusers' name for the number of heads: 32 channels per head
        cross_attention_dim=2 * TEXT_HIDDEN, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * 8,
    ),
    vae=dict(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(16,), layers_per_block=1, norm_num_groups=8,
        sample_size=world.RESOLUTION, mid_block_add_attention=False,
    ),
    text_encoder=dict(hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_hidden_layers=2,
                      num_attention_heads=2, hidden_act="quick_gelu"),
    text_encoder_2=dict(hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_hidden_layers=2,
                        num_attention_heads=2, hidden_act="gelu", projection_dim=TEXT_HIDDEN),
)


@dataclass
class Settings:
    out: str = "out/toy-sdxl"
    steps: int = 4000
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 200
    ema: float = 0.999
    uncond: float = 0.1  # classifier-free guidance dropout
    # extra share of timesteps drawn from the noisiest 30 %: the sampler divides the epsilon error there by
    # sqrt(alpha_bar) (up to 14x), and uniform t left the model worse than predicting the mean image there
    high_t: float = 0.3
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 3e-3
    vae_kl: float = 1e-6
    train_text_encoders: bool = False
    # "cosine", not SDXL's "scaled_linear": at 32 px, scaled_linear's last step still holds enough signal
    # (alpha_bar 0.0047 over 4,096 latent values) for the UNet to read the shape off the noise instead of
    # the prompt, so samples from pure noise ignored the prompt (measured: 25 % shape accuracy at 1,500
    # steps). The cosine schedule ends at alpha_bar ~ 1e-6; sampling uses "trailing" spacing to start there.
    schedule: str = "cosine"
    # "v_prediction", not SDXL's "epsilon": near the last step x_t is almost pure noise, so an epsilon model
    # mostly copies its input and the prompt's shape is a 1 % residual that the sampler divides by
    # sqrt(alpha_bar) (70x at t = 990); a v model predicts the (blurry) image itself there, from the prompt
    prediction: str = "v_prediction"
    # start the UNet (and text encoders) from another run's state.pt, or from a saved pipeline directory (its
    # fp16 EMA weights, e.g. the committed toyworld/weights/toy-sdxl), instead of from scratch; its VAE and
    # latent scale are kept, its optimizer and step count are not
    init_from: str = ""
    stop_after: int = 0  # end after this step (0: at `steps`); the learning-rate schedule still spans `steps`
    # relative sampling weights for styles the model draws poorly, e.g. "checkered=3" (unnamed styles weigh 1);
    # empty: every style equally often
    style_weights: str = ""
    # oversample the cells (shape x style prompts) a model draws worst: the JSON of `toyworld.evaluate --json`
    # for the model being trained on; each cell is drawn in proportion to 1 + weak_boost x (its miss rate),
    # times its style weight
    weak_cells: str = ""
    weak_boost: float = 4.0
    save_every: int = 250
    seed: int = 0
    threads: int = 1
    resume: bool = False


# ---- building the components ----

def build_components(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from unziplora.models import _clip_config, clip_tokenizers

    torch.manual_seed(seed)
    te1 = CLIPTextModel(_clip_config(MODEL_CONFIG["text_encoder"]))
    te2 = CLIPTextModelWithProjection(_clip_config(MODEL_CONFIG["text_encoder_2"]))
    for te in (te1, te2):  # frozen, and exactly what the fp16 files will hold
        # unit-scale token embeddings: with CLIP's init (std 0.02, like the position embeddings) the frozen
        # features of two prompts differed by a tenth of their size and the UNet learned to ignore them
        # (measured: the right prompt lowered the high-noise loss by < 1 % over a wrong one)
        torch.nn.init.normal_(te.get_input_embeddings().weight, std=1.0)
        te.requires_grad_(False).eval()
        for p in te.parameters():
            p.data = p.data.half().float()
    vae = AutoencoderKL(**MODEL_CONFIG["vae"])
    unet = UNet2DConditionModel(**MODEL_CONFIG["unet"])
    tok1, tok2 = clip_tokenizers()
    return dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2)


def encode_prompts(parts: dict, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: penultimate hidden states of both encoders, concatenated; encoder 2's pooled
    projection. Same recipe as StableDiffusionXLPipeline.encode_prompt."""
    states = []
    for tok, te in ((parts["tokenizer"], parts["text_encoder"]), (parts["tokenizer_2"], parts["text_encoder_2"])):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = te(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # for encoder 2: text_embeds (the projection)
    return torch.cat(states, dim=-1), pooled


def style_probabilities(weights: str) -> np.ndarray | None:
    """"checkered=3,striped=2" -> sampling probabilities over world.STYLE_NAMES (None for "")."""
    if not weights:
        return None
    w = dict.fromkeys(world.STYLE_NAMES, 1.0)
    for item in weights.split(","):
        name, _, value = item.strip().partition("=")
        if name not in w or not value:
            raise ValueError(f"style_weights wants NAME=WEIGHT items with NAME in {world.STYLE_NAMES}, got {item!r}")
        w[name] = float(value)
    p = np.array(list(w.values()))
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"style_weights must be non-negative with a positive sum, got {weights!r}")
    return p / p.sum()


def cell_probabilities(s: Settings) -> np.ndarray | None:
    """Sampling probabilities over the world's (shape, style) cells in `world` order, or None when no cell is
    weighted (then batches draw shape and style as before, so earlier stages' runs stay reproducible)."""
    if not s.weak_cells:
        return None
    per_pair = json.loads(Path(s.weak_cells).read_text())["accuracy"]["per_pair"]
    style_p = style_probabilities(s.style_weights)
    weights = []
    for shape in world.SHAPE_NAMES:
        for j, style in enumerate(world.STYLE_NAMES):
            shape_ok, style_ok = per_pair[f"{shape}/{style}"]
            miss = 1 - (shape_ok + style_ok) / 2
            weights.append((1 + s.weak_boost * miss) * (1.0 if style_p is None else style_p[j]))
    p = np.array(weights)
    return p / p.sum()


def state_from_pipeline(path: str, names: list[str]) -> dict:
    """A state.pt-like dict from a saved pipeline directory: its (EMA) weights start both the model and the
    EMA; its VAE and latent scaling factor are kept as they are."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kinds = dict(unet=UNet2DConditionModel, text_encoder=CLIPTextModel, text_encoder_2=CLIPTextModelWithProjection)
    weights, frozen = {}, {}
    for name, kind in kinds.items():
        module = kind.from_pretrained(path, subfolder=name, torch_dtype=torch.float32)
        if name in names:
            weights.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        else:  # kept as they are, but they must be the pipeline's: the UNet learned to read them
            frozen[name] = module.state_dict()
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    return dict(model=weights, ema=weights, vae=vae.state_dict(), scaling_factor=vae.config.scaling_factor,
                frozen=frozen)


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- stage 1: the VAE ----

def train_vae(vae, s: Settings, rng: np.random.Generator, log) -> float:
    """Reconstruction (MSE) + a tiny KL; returns the latent scaling factor (1 / latent std), as SDXL's."""
    # start with a small posterior std (as a trained SDXL VAE has): at the default std 1 the sampling noise
    # swamps the latents and reconstruction learns slowly
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(s.vae_steps):
        x = world.sample_batch(rng, s.vae_batch).images
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = mse + s.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay to 0
            group["lr"] = s.vae_lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / s.vae_steps))
        log("vae", step, mse=mse.item(), kl=kl.item())
    vae.eval().requires_grad_(False)
    for p in vae.parameters():
        p.data = p.data.half().float()
    with torch.no_grad():
        x = world.dataset(10_000, 256).images
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample.clamp(-1, 1)
        psnr = -10 * math.log10(F.mse_loss(recon, x).item() / 4)  # range [-1, 1]: peak^2 = 4
    log("vae_eval", s.vae_steps, psnr_db=psnr, latent_std=z.std().item())
    from toyworld import judges
    if judges.DEFAULT_PATH.exists():  # what matters downstream: do the judges still see shape and style?
        j = judges.load_judges()
        batch = world.dataset(10_000, 256)
        batch.images = recon
        acc = judges.accuracy(j, batch)
        log("vae_eval", s.vae_steps, judged_shape=acc["shape"], judged_style=acc["style"])
    return 1.0 / z.std().item()


# ---- stage 2: the UNet ----

def scheduler_config(schedule: str, prediction: str = "epsilon") -> dict:
    """SDXL's scheduler settings with the toy world's noise schedule (see Settings.schedule)."""
    from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

    from unziplora.models import SCHEDULER_CONFIG

    if schedule == "scaled_linear":
        return SCHEDULER_CONFIG | dict(prediction_type=prediction)
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}: use cosine or scaled_linear")
    betas = betas_for_alpha_bar(SCHEDULER_CONFIG["num_train_timesteps"]).tolist()
    # the usual 0.999 cap on the last beta puts sigma_max at 20,000 (fp16 latents overflow); 0.5 gives
    # alpha_bar 1.2e-6, sigma_max 900, still far below what the noise could hide a shape in
    betas[-1] = min(betas[-1], 0.5)
    # beta_schedule only names it for readers: schedulers take trained_betas when given
    return SCHEDULER_CONFIG | dict(beta_schedule="squaredcos_cap_v2", trained_betas=betas,
                                   timestep_spacing="trailing", steps_offset=0, prediction_type=prediction)


def save_pipeline(parts: dict, scaling_factor: float, out: Path, scheduler: dict) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    parts["vae"].register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
        tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], unet=parts["unet"],
        scheduler=EulerDiscreteScheduler.from_config(scheduler))
    tmp = out.with_name(out.name + ".tmp")
    copy.deepcopy(pipe).to(torch.float16).save_pretrained(tmp, safe_serialization=True)  # training stays fp32
    if out.exists():  # swap in the new copy; the old one survives a crash mid-write
        old = out.with_name(out.name + ".old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def train(s: Settings) -> None:
    from diffusers import DDPMScheduler

    style_p = style_probabilities(s.style_weights)  # first, so a typo fails before any work
    cell_p = cell_probabilities(s)
    torch.set_num_threads(s.threads)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    resume = s.resume and state_path.exists()
    state = torch.load(state_path, weights_only=False) if resume else None
    loss_path = out / "loss.csv"
    if resume:  # a killed run logged steps after its last checkpoint; they are about to be redone
        with open(loss_path, newline="") as f:
            rows = [r for r in csv.reader(f) if r[0] != "unet" or int(r[1]) < state["step"]]
        with open(loss_path, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    loss_file = open(loss_path, "a" if resume else "w", newline="")
    writer = csv.writer(loss_file)
    if not resume:
        writer.writerow(["stage", "step", "name", "value", "seconds"])
    start = time.time()

    def log(stage, step, **values):
        for name, value in values.items():
            writer.writerow([stage, step, name, f"{value:.6g}", f"{time.time() - start:.1f}"])
        loss_file.flush()

    parts = build_components(s.seed)
    rng = np.random.default_rng(s.seed)
    # what trains (and is averaged): the UNet, and the text encoders when asked
    names = ["unet"] + (["text_encoder", "text_encoder_2"] if s.train_text_encoders else [])
    if resume:
        parts["vae"].load_state_dict(state["vae"])
        parts["vae"].eval().requires_grad_(False)
        scaling = state["scaling_factor"]
        rng.bit_generator.state = state["rng"]
        for name, weights in state.get("frozen", {}).items():
            parts[name].load_state_dict(weights)
    elif s.init_from:
        state = (state_from_pipeline(s.init_from, names) if Path(s.init_from).is_dir()
                 else torch.load(s.init_from, weights_only=False))
        for name, weights in state.get("frozen", {}).items():
            parts[name].load_state_dict(weights)
        parts["vae"].load_state_dict(state["vae"])
        parts["vae"].eval().requires_grad_(False)
        scaling = state["scaling_factor"]
    else:
        scaling = train_vae(parts["vae"], s, rng, log)
    vae, unet = parts["vae"], parts["unet"]

    # every prompt of the world (index -1 = the empty prompt); encoded once when the encoders are frozen
    pairs = [(sh, st) for sh in world.SHAPE_NAMES for st in world.STYLE_NAMES]
    all_prompts = [world.prompt(*p) for p in pairs] + [""]
    with torch.no_grad():
        hidden, pooled = encode_prompts(parts, all_prompts)
    index = {p: i for i, p in enumerate(pairs)}
    noise_sched = DDPMScheduler(**scheduler_config(s.schedule, s.prediction))
    res = world.RESOLUTION
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(s.batch, 1)

    model = torch.nn.ModuleDict({n: parts[n] for n in names})
    for n in names:
        parts[n].requires_grad_(True).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=1e-2)
    first = 0
    if s.init_from and not resume:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
    if resume:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        first = state["step"]
        torch.set_rng_state(state["torch_rng"])
    # settings.json keeps every (re)start: a resumed run may change settings from its step on
    record = out / "settings.json"
    runs = json.loads(record.read_text()).get("runs", []) if resume and record.exists() else []
    runs.append({"from_step": first, "settings": asdict(s)})
    record.write_text(json.dumps({"runs": runs, "model": MODEL_CONFIG}, indent=1))
    print(f"unet {param_count(unet) / 1e6:.2f} M params, vae {param_count(vae) / 1e6:.3f} M, "
          f"text encoders {param_count(parts['text_encoder']) / 1e6:.2f} + "
          f"{param_count(parts['text_encoder_2']) / 1e6:.2f} M ({'trained' if s.train_text_encoders else 'frozen'}); "
          f"latent scaling {scaling:.4f}", flush=True)

    t_window = time.time()
    last = min(s.steps, s.stop_after or s.steps)
    for step in range(first, last):
        lr = s.lr * min(1.0, (step + 1) / s.warmup) * 0.5 * (1 + math.cos(math.pi * step / s.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        if cell_p is not None:
            pairs_drawn = rng.choice(len(pairs), size=s.batch, p=cell_p)
            batch = world.batch_of([world.sample_factors(rng, *pairs[i]) for i in pairs_drawn])
        elif style_p is None:
            batch = world.sample_batch(rng, s.batch)
        else:
            styles = rng.choice(world.STYLE_NAMES, size=s.batch, p=style_p)
            batch = world.batch_of([world.sample_factors(rng, style=str(style)) for style in styles])
        with torch.no_grad():
            x0 = vae.encode(batch.images).latent_dist.mode() * scaling
        idx = torch.tensor([index[(f.shape, f.style)] for f in batch.factors])
        u = torch.rand(s.batch)
        empty = u < s.uncond / 2  # the encoded "" prompt
        zeros = (u >= s.uncond / 2) & (u < s.uncond)  # all-zero conditioning
        idx[empty] = len(all_prompts) - 1
        if s.train_text_encoders:
            cond, cond_pooled = encode_prompts(parts, [all_prompts[i] for i in idx])
        else:
            cond, cond_pooled = hidden[idx], pooled[idx]
        keep = (~zeros).float()
        cond, cond_pooled = cond * keep[:, None, None], cond_pooled * keep[:, None]
        noise = torch.randn_like(x0)
        steps_t = noise_sched.config.num_train_timesteps
        t = torch.randint(0, steps_t, (s.batch,))
        high = torch.rand(s.batch) < s.high_t
        t[high] = torch.randint(int(0.7 * steps_t), steps_t, (int(high.sum()),))
        noisy = noise_sched.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond,
                    added_cond_kwargs={"text_embeds": cond_pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(pred, prediction_target(noise_sched, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # EMA with a warm-up, so early checkpoints are not dominated by the init
            decay = min(s.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        log("unet", step, loss=loss.item(), grad_norm=grad_norm.item(), lr=lr)
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{s.steps} loss {loss.item():.4f} "
                  f"{(time.time() - t_window) / 50:.2f} s/step", flush=True)
            t_window = time.time()
        if (step + 1) % s.save_every == 0 or step + 1 == last:
            save_pipeline(parts | dict(ema.items()), scaling, out / "pipeline", dict(noise_sched.config))
            torch.save(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step + 1,
                            vae=vae.state_dict(), scaling_factor=scaling, rng=rng.bit_generator.state,
                            frozen={n: parts[n].state_dict() for n in ("text_encoder", "text_encoder_2")
                                    if n not in names},
                            torch_rng=torch.get_rng_state()), str(state_path) + ".tmp")
            os.replace(str(state_path) + ".tmp", state_path)
    loss_file.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Settings):
        if f.type == "bool" or isinstance(f.default, bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true")
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    train(Settings(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
