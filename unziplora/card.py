"""The model card (`README.md`) of a fit folder, as the Hugging Face Hub expects one: YAML front matter made by
huggingface_hub's ModelCardData, then what the two LoRAs are, their prompts and previews, and how to load them.

Written from the folder's own fit.json, so `write_model_card` can be called again once previews exist.
"""

from __future__ import annotations

import json
from pathlib import Path

from .fit_files import CARD, FILES, LORA_COPY, PREVIEW_PROMPTS, PREVIEWS, RECORD, SCORES

TAGS = ["lora", "text-to-image", "diffusers", "unziplora", "stable-diffusion-xl"]


TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

Two LoRAs decomposed from one stylized image with [UnZipLoRA](https://arxiv.org/abs/2412.04465) (ICCV 2025) by
unziplora: each works alone, and together they redraw the source.

| LoRA | file (diffusers, ComfyUI, A1111) | what it carries | its prompt |
|---|---|---|---|
| content | `content_lora.safetensors` | the subject, `{{ content }}`, without the style | `{{ prompts.content }}` |
| style | `style_lora.safetensors` | the style, {{ style }}, without the subject | `{{ prompts.style }}` |
{% if previews %}
{% for kind, file in previews.items() %}![{{ kind }} LoRA alone]({{ file }})
{% endfor %}
Previews, each LoRA alone away from its source, left to right:
{% for kind in previews %}- {{ kind }}: {% for p in preview_prompts[kind] %}`{{ p }}`{{ "; " if not loop.last }}{% endfor %}
{% endfor %}{% endif %}
{% if scores %}Quality scores ({{ scorer }}, from these previews):
{% for name, value in scores.items() %}{{ name }} {{ "%.2f"|format(value) }}{{ ", " if not loop.last }}{% endfor %}.
{% endif %}{% if gate %}Quality gate ({{ gate.scorer }}, on panels of its own): {{ gate.candidates|length }} candidate fits
(seeds {% for c in gate.candidates %}{{ c.seed }}{{ ", " if not loop.last }}{% endfor %}{% set stopped = gate.candidates|selectattr("stopped_at_step", "defined")|list %}{% if stopped %}; {{ stopped|length }} of them scored after {{ stopped[0].stopped_at_step }} steps and not trained on{% endif %}); kept seed {{ gate.chosen_seed }}, split score
{{ "%.2f"|format(gate.split_score) }}{% if gate.min_split_score %} against the bar {{ "%.2f"|format(gate.min_split_score) }}: {{ "passed" if gate.passed else "never passed (the best found)" }}{% endif %}.
{% endif %}
The source is `{{ prompts.combined }}`: the base model draws it from that prompt while the content LoRA reads the
content prompt and the style LoRA the style prompt (UnZipLoRA's prompt separation); `mergers.safetensors` and
`masks.safetensors` hold the per-column gates of that combined mode.

## Base model
`{{ base_model }}`{% if revision %} at revision `{{ revision }}`{% endif %}, {{ resolution }} px, {{ prediction }}.
Weights fingerprint: `{{ fingerprint }}`.

## Use
diffusers:
```python
{{ load_base }}
pipe.load_lora_weights("FOLDER", weight_name="content_lora.safetensors", adapter_name="content")
image = pipe("{{ prompts.content }} on a beach").images[0]
# a style on any subject:
pipe.load_lora_weights("FOLDER", weight_name="style_lora.safetensors", adapter_name="style")
pipe.set_adapters("style")
image = pipe("A house in {{ style }} style").images[0]
```
ComfyUI: copy `content_lora.safetensors` or `style_lora.safetensors` into `models/loras` and load it with a
LoraLoader node. A1111 / Forge: copy it into `models/Lora` and prompt `<lora:content_lora:1> {{ prompts.content }}`.
The files are in {{ "kohya" if kohya else "diffusers" }} format{% if copies %}; {% for f in copies %}`{{ f }}`{{ " and " if not loop.last }}{% endfor %}
hold the same LoRAs in {{ "diffusers" if kohya else "kohya" }} format{% endif %}. kohya-format files carry `ss_*` and
`modelspec.*` metadata and the `sshs_*` hashes these tools identify LoRAs by;
`unziplora export FOLDER --format diffusers|kohya` writes a LoRA in the other format. The previews were drawn as diffusers' `pipe(prompt)` draws,
with no negative prompt (SDXL's unconditional embedding zeroed). ComfyUI draws that way when the sampler's
negative goes through a `ConditioningZeroOut` node; an encoded empty negative prompt (ComfyUI's text node, A1111)
draws them differently, and in the project's measurements carried them less far.

unziplora: `unziplora generate FOLDER --out combined.png` (both, three-prompt routing),
`--content-from`/`--style-from` to recombine the content of one fit with the style of another.

## Training
| setting | value |
|---|---|
{% for key, value in settings %}| {{ key }} | `{{ value }}` |
{% endfor %}
Final loss {{ "%.4f"|format(final.loss) }} (prediction MSE {{ "%.4f"|format(final.mse) }}). Everything else is in
`fit.json`; `config.yaml` repeats the fit: `unziplora fit IMAGE --config config.yaml --out DIR`.
"""

SHOWN_SETTINGS = ("steps", "rank", "resolution", "lr", "merger_lr", "column_ratio", "recalibrations", "ortho_lambda",
                  "seed", "role_table", "init")


def write_model_card(folder: str | Path) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    from .export import lora_format

    folder = Path(folder)
    record = json.loads((folder / RECORD).read_text())
    settings, prompts = record["settings"], record["prompts"]
    fingerprint = record.get("base_model_fingerprint") or ""
    hub = fingerprint.startswith("hub:")
    previews = {kind: name for kind, name in PREVIEWS.items() if (folder / name).is_file()}
    kohya = lora_format(folder / FILES["content"]) == "kohya"  # fits before the one-file default: diffusers
    copies = sorted(p.name for p in folder.glob(LORA_COPY.format(kind="*", fmt="*")))  # other formats, where written
    shown = _read(folder / PREVIEW_PROMPTS).get("prompts") or {}
    preview_prompts = {kind: shown.get(kind) or [prompts[kind]] for kind in previews}  # older fits: own prompt
    scored = _read(folder / SCORES)
    subject = settings["content"] if len(settings["content"]) < 40 else settings["content"][:37] + "..."
    data = ModelCardData(
        base_model=settings["base_model"] if hub else None, library_name="diffusers", pipeline_tag="text-to-image",
        tags=TAGS, instance_prompt=settings["content"], base_model_relation="adapter" if hub else None,
        widget=[{"text": preview_prompts[kind][0], "output": {"url": name}} for kind, name in previews.items()]
        or None)
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, title=f"UnZipLoRA: {subject} / {settings['style']}",
        content=settings["content"], style=settings["style"], prompts=prompts, previews=previews,
        preview_prompts=preview_prompts, scores=scored.get("scores"), scorer=scored.get("scorer"), gate=record.get("gate"),
        base_model=settings["base_model"], revision=settings.get("revision"), resolution=settings["resolution"],
        prediction="v-prediction" if record.get("prediction_type") == "v_prediction" else "epsilon prediction",
        fingerprint=fingerprint or "unknown", load_base=_load_base_code(settings, fingerprint),
        settings=[(k, settings[k]) for k in SHOWN_SETTINGS if k in settings], final=record["final"], kohya=kohya,
        copies=copies)
    card.save(folder / CARD)
    return folder / CARD


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _load_base_code(settings: dict, fingerprint: str) -> str:
    """How to load this very base model: a hub id at its commit, a folder, a single file, or (offline presets
    and packaged models) through unziplora."""
    name, revision, config = settings["base_model"], settings.get("revision"), settings.get("base_config")
    diffusers = "from diffusers import StableDiffusionXLPipeline\n\npipe = StableDiffusionXLPipeline."
    if fingerprint.startswith("hub:"):
        return diffusers + f'from_pretrained("{name}"' + (f', revision="{revision}")' if revision else ")")
    if fingerprint.startswith("sha256:"):
        return diffusers + f'from_single_file("{name}"' + (f', config="{config}")' if config else ")")
    if fingerprint.startswith("sha256-tree:") and "/" in name:
        return diffusers + f'from_pretrained("{name}")'
    return f'from unziplora import load_base_model\n\npipe = load_base_model("{name}").pipeline()  # made by unziplora'
