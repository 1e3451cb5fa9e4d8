"""A scorer made of the base model itself, for any SDXL with no extra weights (`--scorer base`).

A diffusion model is a zero-shot classifier (Li et al., ICCV 2023): noise an image at a few timesteps and ask
under which prompt the UNet predicts best; that prompt names what the image shows. Here the prompts are the
base model's own preview vocabulary, one per subject ("a house") and one per style ("an image in pencil sketch
style"). What the source image shows is its best subject and its best style; then, as the toy world's judges
score a fit, per panel:
- content kept: a content-LoRA panel's best subject is the source's; style leaked: its best style is;
- style carried: a style-LoRA panel's best style is the source's; shape leaked: its best subject is.
Each score is the share of panels. Every image and prompt is noised with the same noise at the same timesteps,
so the comparison between prompts is paired and most of the noise's variance cancels.

`soft=True` counts each panel by the probability it shows the source's subject (style) instead of 0 or 1: a
softmax over the prompts of minus the errors, standardised per image within subjects (styles), so that it has
no scale to tune. A panel the UNet barely tells apart then moves a score a little, not by a whole panel.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

from unziplora.images import image_to_tensor
from unziplora.training import prediction_target

TIMESTEPS = (0.2, 0.4, 0.6, 0.8)  # fractions of the training schedule: low noise shows texture, high the layout
SEED = 0


class BaseModelScorer:
    name = "base-unet"

    def __init__(self, base, *, timesteps: tuple[float, ...] = TIMESTEPS, resolution: int | None = None,
                 batch_size: int = 16, seed: int = SEED, soft: bool = False):
        self.base, self.batch_size, self.soft = base, batch_size, soft
        if soft:
            self.name = "base-unet-soft"
        self.resolution = resolution or base.default_resolution
        self.subjects, self.styles = list(base.preview_subjects), list(base.preview_styles)
        prompts = [f"a {subject}" for subject in self.subjects] + \
                  [f"an image in {style} style" for style in self.styles]
        with torch.no_grad():
            embeds, _, pooled, _ = base.pipeline().encode_prompt(prompts, device=base.device,
                                                                 do_classifier_free_guidance=False)
        self.embeds, self.pooled = embeds.to(base.dtype), pooled.to(base.dtype)
        last = base.scheduler.config.num_train_timesteps - 1
        self.timesteps = torch.tensor([round(f * last) for f in timesteps], device=base.device)
        side = self.resolution // base.vae_scale_factor
        self.noise = torch.randn((len(timesteps), base.unet.config.in_channels, side, side),
                                 generator=torch.Generator().manual_seed(seed)).to(base.device)

    def classify(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Per image, a distribution over the base's preview subjects and one over its styles: all on the best
        prompt, or with `soft` spread by a softmax of the standardised errors."""
        subjects, styles = [], []
        for image in images:
            errors = self._errors(image)
            subjects.append(self._distribution(errors[:len(self.subjects)]))
            styles.append(self._distribution(errors[len(self.subjects):]))
        return np.array(subjects), np.array(styles)

    def _distribution(self, errors: np.ndarray) -> np.ndarray:
        if not self.soft or len(errors) < 2 or errors.std() == 0:
            return np.eye(len(errors))[int(np.argmin(errors))]
        z = (errors - errors.mean()) / errors.std()
        p = np.exp(-(z - z.min()))
        return p / p.sum()

    @torch.no_grad()
    def _errors(self, image: Image.Image) -> np.ndarray:
        """Per prompt, the UNet's mean squared error on the image noised at every timestep."""
        base, steps = self.base, len(self.timesteps)
        square = ImageOps.fit(image.convert("RGB"), (self.resolution, self.resolution), Image.BICUBIC)
        pixels = image_to_tensor(square).to(base.vae.device, base.vae.dtype)
        x0 = (base.vae.encode(pixels).latent_dist.mode() * base.vae.config.scaling_factor).to(torch.float32)
        x0 = x0.expand(steps, -1, -1, -1)
        noisy = base.scheduler.add_noise(x0, self.noise, self.timesteps).to(base.dtype)
        target = prediction_target(base.scheduler, x0, self.noise, self.timesteps)
        # every (prompt, timestep) pair, in batches
        pairs = [(p, t) for p in range(len(self.embeds)) for t in range(steps)]
        errors = torch.zeros(len(self.embeds), device=base.device)
        r = self.resolution
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            prompt, step = (torch.tensor(column, device=base.device) for column in zip(*chunk))
            time_ids = torch.tensor([[r, r, 0, 0, r, r]] * len(chunk), device=base.device, dtype=base.dtype)
            pred = base.unet(noisy[step], self.timesteps[step], encoder_hidden_states=self.embeds[prompt],
                             added_cond_kwargs={"text_embeds": self.pooled[prompt], "time_ids": time_ids}).sample
            errors.index_add_(0, prompt, ((pred.float() - target[step]) ** 2).mean(dim=(1, 2, 3)))
        return (errors / steps).cpu().numpy()

    def score(self, source, content: list, style: list) -> dict[str, float]:
        subjects, styles = self.classify([source, *content, *style])
        subject, style_of = int(np.argmax(subjects[0])), int(np.argmax(styles[0]))  # what the source shows
        c, s = slice(1, 1 + len(content)), slice(1 + len(content), None)
        out = {}
        if content:
            out |= {"content": float(np.mean(subjects[c, subject])),
                    "content_style_leak": float(np.mean(styles[c, style_of]))}
        if style:
            out |= {"style": float(np.mean(styles[s, style_of])),
                    "style_shape_leak": float(np.mean(subjects[s, subject]))}
        return out
