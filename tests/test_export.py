"""The saved files: diffusers and kohya LoRAs load in a real StableDiffusionXLPipeline and mean exactly
what was trained; atomic writes; generation modes leave the base model untouched."""

import json

import pytest
import torch
from safetensors import safe_open

from unziplora import FitConfig, InputError, fit, load_fit
from unziplora.export import FILES, KOHYA_FILES, kohya_module_name
from unziplora.generate import generate


@pytest.fixture(scope="module")
def fitted(tiny_base, tmp_path_factory):
    """One short fit, saved in fp32 so file contents can be compared exactly."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("fit")
    image = root / "img.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(image)
    config = FitConfig(content="sks dog", style="watercolor painting", steps=8, rank=4, save_precision="fp32")
    result = fit(image, config, base=tiny_base, out_dir=root / "out", progress=False)
    return result, load_fit(root / "out")


def _unet_out(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def _with_folded(unet, state_dicts, inputs):
    """UNet output with W0 + sum_k B_k A_k written into the weights by hand (the meaning of the files)."""
    saved = {}
    with torch.no_grad():
        for sd in state_dicts:
            for key, A in sd.items():
                if not key.endswith("lora_A.weight"):
                    continue
                name = key.removesuffix(".lora_A.weight")
                weight = unet.get_submodule(name).weight
                saved.setdefault(name, weight.detach().clone())
                weight += sd[f"{name}.lora_B.weight"] @ A
        try:
            return _unet_out(unet, inputs)
        finally:
            for name, w in saved.items():
                unet.get_submodule(name).weight.copy_(w)


def _pipe_out(tiny_base, fitted_dir, files, inputs):
    pipe = tiny_base.pipeline()
    names = []
    try:
        for i, f in enumerate(files):
            pipe.load_lora_weights(str(fitted_dir), weight_name=f, adapter_name=f"a{i}")
            names.append(f"a{i}")
        pipe.set_adapters(names, [1.0] * len(names))
        return _unet_out(pipe.unet, inputs)
    finally:
        pipe.unload_lora_weights()


def test_files_written(fitted):
    result, art = fitted
    names = {p.name for p in art.path.iterdir()}
    assert names == {*FILES.values(), *KOHYA_FILES.values(), "mergers.safetensors", "masks.safetensors",
                     "fit.json", "config.yaml"}
    record = json.loads((art.path / "fit.json").read_text())
    assert record["settings"]["steps"] == 8 and record["prompts"]["style"] == "A dog in watercolor painting style"
    assert set(record["mask_stats"]) == {"content", "style", "shared"}
    assert record["timings"]["train_s"] > 0 and record["versions"]["torch"]
    assert art.config == result.config


@pytest.mark.parametrize("kind", ["content", "style"])
def test_diffusers_file_changes_output_by_exactly_the_folded_lora(tiny_base, fitted, unet_inputs, kind):
    _, art = fitted
    state = art.lora_state_dict(kind)
    base_out = _unet_out(tiny_base.unet, unet_inputs)
    loaded = _pipe_out(tiny_base, art.path, [FILES[kind]], unet_inputs)
    expected = _with_folded(tiny_base.unet, [state], unet_inputs)
    assert not torch.allclose(loaded, base_out, atol=1e-4)  # the LoRA does something
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_unet_out(tiny_base.unet, unet_inputs), base_out, atol=0, rtol=0)  # unloaded


@pytest.mark.parametrize("kind", ["content", "style"])
def test_kohya_file_gives_the_same_output(tiny_base, fitted, unet_inputs, kind):
    _, art = fitted
    diffusers_out = _pipe_out(tiny_base, art.path, [FILES[kind]], unet_inputs)
    kohya_out = _pipe_out(tiny_base, art.path, [KOHYA_FILES[kind]], unet_inputs)
    torch.testing.assert_close(kohya_out, diffusers_out, atol=1e-5, rtol=1e-5)


def test_kohya_metadata_and_keys(fitted):
    _, art = fitted
    with safe_open(art.lora_file("style", kohya=True), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.trigger_phrase"] == "watercolor painting"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 4.0
    assert all(k.startswith("lora_unet_") for k in keys)
    assert sum(k.endswith(".alpha") for k in keys) == sum(k.endswith(".lora_down.weight") for k in keys) == 88


def test_kohya_names_follow_sdxl_block_numbering():
    assert kohya_module_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert kohya_module_name("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0") == \
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0"
    assert kohya_module_name("mid_block.attentions.0.transformer_blocks.3.attn2.to_k") == \
        "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_k"
    assert kohya_module_name("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_v") == \
        "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_v"


def test_content_plus_style_adds_up_to_combined(tiny_base, fitted, unet_inputs):
    _, art = fitted
    both = _pipe_out(tiny_base, art.path, [FILES["content"], FILES["style"]], unet_inputs)
    expected = _with_folded(tiny_base.unet, [art.lora_state_dict("content"), art.lora_state_dict("style")],
                            unet_inputs)
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-5)


def test_masks_are_folded_into_lora_B(fitted):
    _, art = fitted
    masks = art.masks()
    for kind in ("content", "style"):
        state = art.lora_state_dict(kind)
        for key, mask in masks.items():
            name, k = key.rsplit(".", 1)
            if k == kind:
                rows = state[f"{name}.lora_B.weight"].abs().sum(dim=1)
                assert torch.all(rows[mask == 0] == 0)


def test_saved_tensors_equal_result_tensors(fitted):
    result, art = fitted
    for kind in ("content", "style"):
        saved = art.lora_state_dict(kind)
        assert saved.keys() == result.tensors[kind].keys()
        assert all(torch.equal(saved[k], result.tensors[kind][k]) for k in saved)


def test_fp16_files_by_default(tiny_base, sample_image, tmp_path):
    fit(sample_image, FitConfig(content="sks dog", style="ink", steps=3, rank=2), base=tiny_base,
        out_dir=tmp_path / "o", progress=False)
    assert load_fit(tmp_path / "o").lora_state_dict("content")[
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"].dtype == torch.float16


def test_existing_output_dir_refused_unless_overwrite(tiny_base, sample_image, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = FitConfig(content="sks dog", style="ink", steps=3, rank=2)
    with pytest.raises(InputError, match="exists"):
        fit(sample_image, config, base=tiny_base, out_dir=out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    fit(sample_image, config, base=tiny_base, out_dir=out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "fit.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "sample.png"]  # no staging or trash left


def test_failed_write_leaves_nothing(tiny_base, sample_image, tmp_path, monkeypatch):
    import unziplora.export as export

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        fit(sample_image, FitConfig(content="sks dog", style="ink", steps=3, rank=2), base=tiny_base,
            out_dir=tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == [sample_image]


def test_load_fit_refuses_other_dirs(tmp_path):
    with pytest.raises(InputError, match="not a fit directory"):
        load_fit(tmp_path)


def _unet_is_clean(base, processors_before):
    keys = base.unet.state_dict().keys()
    assert not any("lora" in k for k in keys)
    assert not getattr(base.unet, "peft_config", None)
    assert {k: type(v) for k, v in base.unet.attn_processors.items()} == processors_before


@pytest.mark.parametrize("which", ["content", "style", "routed", "direct"])
def test_generate_modes(tiny_base, fitted, which):
    _, art = fitted
    before = {k: type(v) for k, v in tiny_base.unet.attn_processors.items()}
    kwargs = {"content": dict(content=art), "style": dict(style=art),
              "routed": dict(content=art, style=art, mode="routed"),
              "direct": dict(content=art, style=art, mode="direct")}[which]
    images = generate(tiny_base, steps=2, seed=3, **kwargs)
    again = generate(tiny_base, steps=2, seed=3, **kwargs)
    assert images[0].size == (64, 64)
    assert images[0].tobytes() == again[0].tobytes()  # seeded, and nothing leaked between the calls
    _unet_is_clean(tiny_base, before)


def test_routed_differs_from_direct_and_base(tiny_base, fitted):
    _, art = fitted
    routed = generate(tiny_base, content=art, style=art, mode="routed", steps=2)[0]
    direct = generate(tiny_base, content=art, style=art, mode="direct", steps=2)[0]
    plain = tiny_base.pipeline()(art.record["prompts"]["combined"], num_inference_steps=2, height=64, width=64,
                                 guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images[0]
    assert len({routed.tobytes(), direct.tobytes(), plain.tobytes()}) == 3


def test_generate_several_images_routed(tiny_base, fitted):
    _, art = fitted
    images = generate(tiny_base, content=art, style=art, steps=1, num_images=2)
    assert len(images) == 2
