"""The saved files: each LoRA once, in kohya format, loads in a real StableDiffusionXLPipeline and means exactly
what was trained; the diffusers format on request or by conversion, and fits written in both formats (older
libraries) still load; atomic writes; generation modes leave the base model untouched."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from unziplora import FitConfig, InputError, fit, load_fit
from unziplora.export import FILES, FitArtifacts, kohya_module_name, lora_file_name, lora_format
from unziplora.generate import generate, generate_each
from unziplora.fit_files import CARD, CONFIG, MASKS, MERGERS, PREVIEWS, RECORD


@pytest.fixture(scope="module")
def fitted(tiny_base, tmp_path_factory):
    """One short fit, saved in fp32 so file contents can be compared exactly."""
    root = tmp_path_factory.mktemp("fit")
    image = _random_image(root / "img.png", seed=7)
    config = FitConfig(content="sks dog", style="watercolor painting", steps=8, rank=4, save_precision="fp32")
    result = fit(image, config, base=tiny_base, out_dir=root / "out", progress=False)
    return result, load_fit(root / "out")


@pytest.fixture(scope="module")
def old_layout(tiny_base, tmp_path_factory):
    """The same fit written as every fit was before the one-file default: a diffusers-format
    {kind}_lora.safetensors and a kohya-format {kind}_lora_kohya.safetensors."""
    root = tmp_path_factory.mktemp("old")
    image = _random_image(root / "img.png", seed=7)
    config = FitConfig(content="sks dog", style="watercolor painting", steps=8, rank=4, save_precision="fp32")
    fit(image, config, base=tiny_base, out_dir=root / "out", progress=False, formats=("diffusers", "kohya"))
    return load_fit(root / "out")


def _random_image(path, seed: int):
    """A 72 px noise PNG at `path`."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(path)
    return path


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
    assert names == {*FILES.values(), MERGERS, MASKS, RECORD, CONFIG, CARD}  # each LoRA once
    assert all(lora_format(art.path / name) == "kohya" for name in FILES.values())
    record = json.loads((art.path / RECORD).read_text())
    assert record["settings"]["steps"] == 8 and record["prompts"]["style"] == "A dog in watercolor painting style"
    assert set(record["mask_stats"]) == {"content", "style", "shared"}
    assert record["timings"]["train_s"] > 0 and record["versions"]["torch"]
    # the final timings are in the file, not only in memory
    timings = record["timings"]
    assert 0 < timings["export_s"] < timings["total_s"] and timings["total_s"] >= timings["train_s"]
    assert record["timings"] == result.record["timings"]
    assert art.config == result.config


@pytest.mark.parametrize("kind", ["content", "style"])
def test_lora_file_changes_output_by_exactly_the_folded_lora(tiny_base, fitted, unet_inputs, kind):
    _, art = fitted
    state = art.lora_state_dict(kind)
    base_out = _unet_out(tiny_base.unet, unet_inputs)
    loaded = _pipe_out(tiny_base, art.path, [FILES[kind]], unet_inputs)
    expected = _with_folded(tiny_base.unet, [state], unet_inputs)
    assert not torch.allclose(loaded, base_out, atol=1e-4)  # the LoRA does something
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_unet_out(tiny_base.unet, unet_inputs), base_out, atol=0, rtol=0)  # unloaded


@pytest.mark.parametrize("kind", ["content", "style"])
def test_old_layout_and_conversions_give_the_same_output(tiny_base, fitted, old_layout, unet_inputs, kind, tmp_path):
    """A fit written in both formats (the old layout) and the one-file fit's LoRA converted to diffusers format
    (`export_lora`) load to the very output of the kohya file; the tensors read back are the same."""
    from unziplora.export import export_lora

    _, art = fitted
    kohya_out = _pipe_out(tiny_base, art.path, [FILES[kind]], unet_inputs)
    assert lora_format(old_layout.lora_file(kind)) == "diffusers"
    assert old_layout.lora_file(kind, "kohya").name == f"{kind}_lora_kohya.safetensors"
    for folder, name in ((old_layout.path, FILES[kind]), (old_layout.path, f"{kind}_lora_kohya.safetensors")):
        torch.testing.assert_close(_pipe_out(tiny_base, folder, [name], unet_inputs), kohya_out, atol=1e-5, rtol=1e-5)
    converted = export_lora(art, kind, "diffusers", tmp_path)
    assert converted.name == f"{kind}_lora_diffusers.safetensors" and lora_format(converted) == "diffusers"
    assert sorted(p.name for p in tmp_path.iterdir()) == [converted.name]  # no staging left
    torch.testing.assert_close(_pipe_out(tiny_base, tmp_path, [converted.name], unet_inputs), kohya_out,
                               atol=1e-5, rtol=1e-5)
    old, new = old_layout.lora_state_dict(kind), art.lora_state_dict(kind)
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_old_layout_generates_as_before(tiny_base, fitted, old_layout):
    """generate (each LoRA alone, direct, routed) and the previews' generate_each draw the same pixels from an
    old two-format fit as from the one-file fit of the same training."""
    _, art = fitted
    for kwargs in ({"content": "x"}, {"style": "x"}, {"content": "x", "style": "x", "mode": "direct"},
                   {"content": "x", "style": "x", "mode": "routed"}):
        new = generate(tiny_base, steps=2, seed=3, **{k: art if v == "x" else v for k, v in kwargs.items()})
        old = generate(tiny_base, steps=2, seed=3, **{k: old_layout if v == "x" else v for k, v in kwargs.items()})
        assert new[0].tobytes() == old[0].tobytes(), kwargs
    prompts = {"content": "a sks thing", "style": "a cat in the style"}
    new = generate_each(tiny_base, {"content": art, "style": art}, prompts, steps=2, seed=3)
    old = generate_each(tiny_base, {"content": old_layout, "style": old_layout}, prompts, steps=2, seed=3)
    assert all(new[k][0].tobytes() == old[k][0].tobytes() for k in prompts)


def test_formats_on_request(tiny_base, sample_image, tmp_path):
    """`formats`: the first is {kind}_lora.safetensors, the others beside it; unknown or repeated ones refused
    before any training."""
    config = FitConfig(content="sks dog", style="ink", steps=2, rank=2, recalibrations=1)
    fit(sample_image, config, base=tiny_base, out_dir=tmp_path / "o", progress=False, formats="kohya,diffusers")
    art = load_fit(tmp_path / "o")
    assert lora_format(art.lora_file("style")) == "kohya"
    assert art.lora_file("style", "diffusers").name == "style_lora_diffusers.safetensors"
    assert lora_format(art.lora_file("style", "diffusers")) == "diffusers"
    for i, bad in enumerate(("ckpt", "kohya,kohya", ",")):
        with pytest.raises(InputError, match="LoRA formats"):
            fit(sample_image, config, base=tiny_base, out_dir=tmp_path / f"bad{i}", progress=False, formats=bad)
        assert not (tmp_path / f"bad{i}").exists()
    fit(sample_image, config, base=tiny_base, out_dir=tmp_path / "k", progress=False)
    with pytest.raises(InputError, match="no diffusers-format content LoRA.*unziplora export"):
        load_fit(tmp_path / "k").lora_file("content", "diffusers")


def test_kohya_metadata_and_keys(fitted):
    _, art = fitted
    with safe_open(art.lora_file("style"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.trigger_phrase"] == "watercolor painting"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 4.0
    assert all(k.startswith("lora_unet_") for k in keys)
    assert sum(k.endswith(".alpha") for k in keys) == sum(k.endswith(".lora_down.weight") for k in keys) == 88


def _sd_scripts_hashes(path) -> tuple[str, str]:
    """The two hashes as sd-scripts defines them, from the file's bytes: sha256 of everything after the header;
    sha256 of the 64 KiB at 1 MiB of the same tensors written with the ss_* metadata alone (first 8 hex)."""
    import hashlib

    from safetensors.torch import load_file, save

    data = path.read_bytes()
    model_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    with safe_open(path, "pt") as f:
        ss = {k: v for k, v in f.metadata().items() if k.startswith("ss_")}
    legacy = hashlib.sha256(save(load_file(path), ss)[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


@pytest.mark.parametrize("kind", ["content", "style"])
def test_kohya_files_carry_the_hashes_tools_identify_loras_by(fitted, kind):
    _, art = fitted
    path = art.lora_file(kind)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    model_hash, legacy = _sd_scripts_hashes(path)
    assert meta["sshs_model_hash"] == model_hash and meta["sshs_legacy_hash"] == legacy
    assert meta["modelspec.hash_sha256"] == "0x" + model_hash


def test_legacy_hash_reads_the_bytes_at_one_mebibyte(tmp_path):
    """A LoRA of a real size (the fitted tiny one is under 1 MiB, where the legacy hash reads nothing)."""
    from safetensors.torch import save_file

    from unziplora.export import with_hashes

    tensors = {f"lora_unet_x{i}.lora_down.weight": torch.randn(64, 1280, generator=torch.Generator().manual_seed(i))
               .half() for i in range(8)}
    metadata = with_hashes(tensors, {"ss_network_dim": "64", "modelspec.title": "changes nothing here"})
    save_file(tensors, tmp_path / "big.safetensors", metadata=metadata)
    assert (tmp_path / "big.safetensors").stat().st_size > 0x110000
    model_hash, legacy = _sd_scripts_hashes(tmp_path / "big.safetensors")
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == (model_hash, legacy)
    assert legacy != "e3b0c442"  # not the hash of nothing
    # an oracle that never parses a file: the data after the header is the tensors' raw bytes, in name order
    # (one dtype: safetensors orders by alignment, then name)
    raw = b"".join(tensors[k].numpy().tobytes() for k in sorted(tensors))
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw).hexdigest()


def test_kohya_metadata_follows_the_base_model(fitted, tmp_path):
    """Prediction type and v-parameterization come from the base's scheduler (epsilon SDXL, v-prediction toy),
    the base's name and revision from the settings, the base checkpoint's sha256 when it was one file."""
    from unziplora.export import kohya_metadata

    result, art = fitted
    with safe_open(art.lora_file("content"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["ss_v_parameterization"] == "False"
    assert meta["ss_sd_model_name"] == "tiny" and meta["modelspec.resolution"] == "64x64"
    record = result.record | {"prediction_type": "v_prediction", "base_model_fingerprint": "sha256:" + "ab" * 32}
    config = result.config.replace(base_model="/models/xl.safetensors")
    v = kohya_metadata("content", config, record)
    assert v["modelspec.prediction_type"] == "v" and v["ss_v_parameterization"] == "True"
    assert v["ss_new_sd_model_hash"] == "ab" * 32 and v["ss_sd_model_name"] == "/models/xl.safetensors"
    hub = kohya_metadata("content", result.config.replace(base_model="org/xl", revision="c0ffee"),
                         result.record | {"base_model_fingerprint": "hub:org/xl@c0ffee"})
    assert hub["ss_sd_model_name"] == "org/xl@c0ffee" and "ss_new_sd_model_hash" not in hub


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_lora_files_load_with_their_trained_rank_and_alpha(tiny_base, fitted, old_layout, layout):
    """The kohya file: rank from the shapes, alpha from its `.alpha` entries (diffusers reads no adapter metadata
    from a kohya file); the diffusers file: peft's LoraConfig in its metadata. Both load as trained."""
    _, art = fitted
    folder = art.path if layout == "kohya" else old_layout.path
    with safe_open(folder / FILES["content"], "pt") as f:
        meta = f.metadata()
        alphas = {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")}
    if layout == "diffusers":
        stored = json.loads(meta["lora_adapter_metadata"])
        assert stored["unet.r"] == 4 and stored["unet.lora_alpha"] == 4
    else:
        assert "lora_adapter_metadata" not in meta
        assert alphas == {4.0}
    pipe = tiny_base.pipeline()
    try:
        pipe.load_lora_weights(str(folder), weight_name=FILES["content"], adapter_name="content")
        config = pipe.unet.peft_config["content"]
        assert config.r == 4 and config.lora_alpha == 4 and set(config.alpha_pattern.values()) <= {4}
        assert {name.rsplit(".", 1)[-1] for name in config.target_modules} <= {"to_q", "to_k", "to_v", "0"}
    finally:
        pipe.unload_lora_weights()


def test_model_card_as_the_hub_reads_it(fitted, old_layout, tmp_path):
    """README.md parses with huggingface_hub's ModelCard: front matter with the tags, the instance prompt and
    (for a hub base) base_model; the body names both LoRAs, their prompts, how to load them; previews appear
    once they exist."""
    import shutil

    from huggingface_hub import ModelCard

    from unziplora.card import write_model_card

    _, art = fitted
    card = ModelCard.load(art.path / CARD)
    assert {"lora", "text-to-image", "diffusers", "unziplora"} <= set(card.data.tags)
    assert card.data.instance_prompt == "sks dog" and card.data.base_model is None  # tiny: not on the Hub
    for text in (FILES["content"], FILES["style"], "A sks dog", "kohya format",
                 "A dog in watercolor painting style", "load_lora_weights", "<lora:content_lora:1>",
                 "unziplora export FOLDER --format diffusers"):
        assert text in card.text, text
    assert "_kohya" not in card.text and "The files are in kohya format." in card.text
    old = ModelCard.load(old_layout.path / CARD).text  # an old two-format fit's card names both
    assert "The files are in diffusers format; `content_lora_kohya.safetensors` and `style_lora_kohya" in old
    folder = shutil.copytree(art.path, tmp_path / "fit")
    record = json.loads((folder / RECORD).read_text())
    record["settings"] |= {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "revision": "462165984030"}
    record["base_model_fingerprint"] = "hub:stabilityai/stable-diffusion-xl-base-1.0@462165984030"
    (folder / RECORD).write_text(json.dumps(record))
    (folder / PREVIEWS["style"]).write_bytes(b"png")
    card = ModelCard.load(write_model_card(folder))
    assert card.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert card.data.widget == [{"text": "A dog in watercolor painting style", "output": {"url": PREVIEWS["style"]}}]
    assert "](preview_style.png)" in card.text and 'revision="462165984030"' in card.text


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
        checked = masked_out = kept = 0
        for key, mask in masks.items():
            name, k = key.rsplit(".", 1)
            if k == kind:
                rows = state[f"{name}.lora_B.weight"].abs().sum(dim=1)
                assert torch.all(rows[mask == 0] == 0)
                checked, masked_out, kept = checked + 1, masked_out + int((mask == 0).sum()), kept + int((rows[mask == 1] > 0).sum())
        # not vacuous: every layer's mask was read, some columns are masked out, the kept ones carry the LoRA
        assert checked == len(masks) // 2 and masked_out > 0 and kept > 0, (kind, checked, masked_out, kept)


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
    assert not (out / "keep.txt").exists() and (out / RECORD).is_file()
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
    # the style LoRA's own prompt in the routed mode: another prompt, another image; refused where it means nothing
    reworded = generate(tiny_base, content=art, style=art, mode="routed", steps=2,
                        style_prompt="An image in watercolor style")[0]
    assert reworded.tobytes() != routed.tobytes()
    for alone in (dict(content=art), dict(content=art, style=art, mode="direct")):
        with pytest.raises(InputError, match="style_prompt"):
            generate(tiny_base, steps=1, style_prompt="An image in watercolor style", **alone)


def test_content_on_its_own_blocks_only(tiny_base, fitted, old_layout):
    """`content_blocks="own"`: the content LoRA acts where it holds every column (role "content") and nowhere
    else; the style LoRA is untouched; the images change; "auto" is "own" for two fits only; refused where it
    means nothing."""
    from unziplora.generate import load_adapter, own_blocks_weights

    _, art = fitted
    before = {k: v.clone() for k, v in tiny_base.unet.state_dict().items()}
    whole, own = load_adapter(tiny_base, art, old_layout), load_adapter(tiny_base, art, old_layout, "own")
    roles = set()
    for (name, a), (_, b) in zip(whole.named_layers(), own.named_layers()):
        roles.add(a.role.name)
        for kind in ("content", "style"):
            kept = kind == "style" or a.role.name == "content"
            (A, B), (A2, B2) = a.factors(kind), b.factors(kind)
            assert torch.equal(A, A2) and (torch.equal(B, B2) if kept else not B2.any() and B.any()), (name, kind)
    assert {"content", "style", "shared"} <= roles  # the SDXL table's three roles, on tiny
    drawn = {blocks: generate(tiny_base, content=art, style=old_layout, steps=2, content_blocks=blocks)[0].tobytes()
             for blocks in ("all", "own", "auto")}
    assert drawn["all"] != drawn["own"] == drawn["auto"]  # two fits: recombined, by default on its own blocks
    pair = {blocks: generate(tiny_base, content=art, style=art, steps=2, content_blocks=blocks)[0].tobytes()
            for blocks in ("all", "auto")}
    assert pair["all"] == pair["auto"]  # one fit's own pair: as it was fitted
    # the direct mode (plain LoRA files under one prompt): the content file's layers of its own blocks only
    weights = own_blocks_weights(art, "content", tiny_base)
    content_layers = {name for name, layer in whole.named_layers() if layer.role.name == "content"}
    assert {key.removeprefix("unet.").rsplit(".lora_", 1)[0] for key in weights} == content_layers
    direct = {blocks: generate(tiny_base, content=art, style=old_layout, steps=2, mode="direct",
                               content_blocks=blocks)[0].tobytes() for blocks in ("all", "own", "auto")}
    assert direct["all"] == direct["auto"] != direct["own"]  # auto: own in the routed mode only (measured there)
    assert all(torch.equal(v, before[k]) for k, v in tiny_base.unet.state_dict().items())
    with pytest.raises(InputError, match="content_blocks='own'"):
        generate(tiny_base, steps=1, content_blocks="own", content=art)


def test_content_blocks_on_the_sdxl_table_at_full_size():
    """SDXL's own role table on the full-size architecture (meta device, no weights): "own" keeps the content
    LoRA in up_blocks.0's attentions 0 and 2 only."""
    from unziplora.generate import own_blocks_only
    from unziplora.layers import UnZipLoRA
    from unziplora.models import build_preset, place

    meta = torch.device("meta")
    base = place(build_preset("sdxl-random", device=meta, dtype=torch.bfloat16), meta)
    adapter = UnZipLoRA(base.unet, 4, "sdxl", init="zeros").to(meta)
    own_blocks_only(adapter, "content")  # on meta the zeroing is a no-op; which layers it spares is the point
    spared = {name.split(".transformer_blocks")[0] for name, layer in adapter.named_layers()
              if layer.role.is_full("content")}
    assert spared == {"up_blocks.0.attentions.0", "up_blocks.0.attentions.2"}
    shared = UnZipLoRA(base.unet, 4, "none", init="zeros").to(meta)  # every block shared: no blocks of its own
    with pytest.raises(InputError, match="no blocks of its own"):
        own_blocks_only(shared, "content")
    own_blocks_only(shared, "content", required=False)  # "auto": left as it is


def test_generate_several_images_routed(tiny_base, fitted):
    _, art = fitted
    images = generate(tiny_base, content=art, style=art, steps=1, num_images=2)
    assert len(images) == 2


def test_generate_each_draws_each_lora_as_generate_does(tiny_base, fitted, tmp_path):
    """The previews' way (one adapter: the fit's first LoRA loaded, its second swapped in) gives the very pixels
    of drawing each LoRA alone, and leaves the pipeline without adapters."""
    result, art = fitted
    prompts = {"content": ["a sks thing in pixel art", "a sks thing in ink"], "style": "a cat in the style"}
    each = generate_each(tiny_base, {"content": art, "style": art}, prompts, steps=2, seed=3)
    for kind in ("content", "style"):
        alone = generate(tiny_base, steps=2, seed=3, prompt=prompts[kind], **{kind: art})
        assert [i.tobytes() for i in each[kind]] == [i.tobytes() for i in alone], kind
    assert not getattr(tiny_base.pipeline().unet, "peft_config", None)
    # the fit still in memory (the job's previews, drawn on the device before its files are written): the same
    in_memory = FitArtifacts.of(result)
    drawn = generate_each(tiny_base, {"content": in_memory, "style": in_memory}, prompts, steps=2, seed=3)
    assert {k: [i.tobytes() for i in v] for k, v in drawn.items()} == {k: [i.tobytes() for i in v]
                                                                       for k, v in each.items()}
    # LoRAs of two fits (here of two ranks: a hotswap would draw other pixels, silently) load the plain way
    other = tmp_path / "rank2"
    fit(_random_image(tmp_path / "b.png", seed=8), art.config.replace(rank=2, steps=2, recalibrations=1),
        base=tiny_base, out_dir=other, progress=False)
    other = load_fit(other)
    each = generate_each(tiny_base, {"content": art, "style": other}, prompts, steps=2, seed=3)
    alone = generate(tiny_base, steps=2, seed=3, prompt=prompts["style"], style=other)
    assert [i.tobytes() for i in each["style"]] == [i.tobytes() for i in alone]


def test_generate_draws_as_diffusers_does(tiny_base, fitted):
    """No negative prompt by default, as diffusers' `pipe(prompt)` draws (SDXL zeroes the unconditional
    embedding); an encoded "" is another draw, in both the one-LoRA and the routed mode."""
    _, art = fitted
    pipe = tiny_base.pipeline()
    pipe.load_lora_weights(str(art.path), weight_name=FILES["content"], adapter_name="content")
    try:
        theirs = pipe(art.record["prompts"]["content"], num_inference_steps=2, height=64, width=64,
                      guidance_scale=tiny_base.guidance, generator=torch.Generator().manual_seed(3)).images[0]
    finally:
        pipe.unload_lora_weights()
    assert generate(tiny_base, content=art, steps=2, seed=3)[0].tobytes() == theirs.tobytes()
    assert generate(tiny_base, content=art, steps=2, seed=3, negative_prompt="")[0].tobytes() != theirs.tobytes()

    def routed(negative):
        return generate(tiny_base, content=art, style=art, steps=2, negative_prompt=negative)[0].tobytes()
    assert routed(None) != routed("")


@pytest.mark.parametrize("layout", ["one file", "both formats"])
def test_budget_model_counts_the_bytes_a_fit_writes(fitted, old_layout, layout):
    """benchmarks/sdxl_budget.py's byte count (shapes on the meta device, no tensors) is the size of the files
    write_fit wrote, byte for byte: the figure it prints for SDXL is the same count."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "sdxl_budget.py"
    spec = importlib.util.spec_from_file_location("sdxl_budget", path)
    budget = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sdxl_budget", budget)
    spec.loader.exec_module(budget)
    art = fitted[1] if layout == "one file" else old_layout
    formats = ("kohya",) if layout == "one file" else ("diffusers", "kohya")
    counted = budget.export_bytes("tiny", formats=formats, config=art.config)
    written = {p.name: p.stat().st_size for p in art.path.glob("*.safetensors")}
    assert counted == written


def test_a_fit_folders_file_names_are_the_documented_ones():
    """unziplora/fit_files.py spells each name once and every module and test reads it there; this pins them,
    since users, the model card, ComfyUI / A1111 and older libraries know the files by these names."""
    from unziplora import fit_files

    assert fit_files.FILES == {"content": "content_lora.safetensors", "style": "style_lora.safetensors"}
    assert lora_file_name("style", "diffusers") == "style_lora_diffusers.safetensors"
    assert lora_file_name("style", "diffusers", ("diffusers", "kohya")) == "style_lora.safetensors"
    assert (fit_files.MERGERS, fit_files.MASKS, fit_files.RECORD, fit_files.CONFIG, fit_files.CARD) == \
        ("mergers.safetensors", "masks.safetensors", "fit.json", "config.yaml", "README.md")
    assert fit_files.PREVIEWS == {"content": "preview_content.png", "style": "preview_style.png"}
    assert (fit_files.PREVIEW_PROMPTS, fit_files.SCORES, fit_files.HISTORY) == \
        ("previews.json", "scores.json", "history.json")
