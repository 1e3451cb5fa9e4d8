"""Tests for unziplora.importance (cone scores, top-k, recalibration) and the column schedule of a fit."""

import pytest
import torch
from unziplora import importance
from unziplora.config import FitConfig
from unziplora.errors import FitDivergedError
from unziplora.training import fit
from unziplora.importance import CONE_THRESHOLD, cone_scores, recalibrate, top_k_columns
from unziplora.layers import DualLoRALinear, PromptRoutingProcessor, UnZipLoRA
from unziplora.roles import KINDS, role_for

RATIO = 0.1


def fit_config(**changes):
    settings = dict(content="sks dog", style="watercolor painting", steps=6, rank=4, recalibrations=3)
    return FitConfig(**(settings | changes))


def picked(mask):
    return set(torch.nonzero(mask).flatten().tolist())


def unet_state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def assert_unet_restored(unet, state, processor_types):
    assert not [m for m in unet.modules() if isinstance(m, DualLoRALinear)]
    assert not [p for p in unet.attn_processors.values() if isinstance(p, PromptRoutingProcessor)]
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processor_types
    now = unet.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())


# ---- 1. top_k_columns ----

def test_top_k_picks_exactly_k_highest():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.5, 0.0])
    kept = scores.clone()
    out = top_k_columns(scores, 3, torch.tensor([0.0, 0, 0, 0, 0, 1]))
    assert out.tolist() == [0, 1, 0, 1, 1, 0]
    assert torch.equal(scores, kept)  # input untouched


def test_top_k_ties_go_to_the_lowest_index():
    assert top_k_columns(torch.zeros(10), 4).tolist() == [1] * 4 + [0] * 6
    scores = torch.tensor([0.2, 0.5, 0.5, 0.5, 0.1, 0.5])
    assert picked(top_k_columns(scores, 2)) == {1, 2}
    assert picked(top_k_columns(scores, 5)) == {0, 1, 2, 3, 5}


def test_top_k_never_picks_forbidden_columns():
    scores = torch.arange(8.0, 0.0, -1.0)  # column 0 best
    forbidden = torch.tensor([1.0, 1, 0, 0, 1, 0, 0, 0])
    assert picked(top_k_columns(scores, 3, forbidden)) == {2, 3, 5}
    # k beyond the allowed columns: only the allowed ones
    assert picked(top_k_columns(scores, 8, forbidden)) == {2, 3, 5, 6, 7}
    assert top_k_columns(scores, 3, torch.ones(8)).sum() == 0
    ties = top_k_columns(torch.zeros(8), 2, forbidden)
    assert picked(ties) == {2, 3}


def test_top_k_zero_and_too_large_k():
    scores = torch.rand(6)
    assert top_k_columns(scores, 0).sum() == 0
    assert torch.equal(top_k_columns(scores, 100), torch.ones(6))


# ---- 2. cone scores ----

def layer_with_grads(small_adapter, seed=0):
    """The 12-wide to_q of a small adapter in float64, with random .grad tensors on its LoRA factors."""
    adapter = small_adapter(rank=3, seed=seed).double()
    layer = dict(adapter.named_layers())["blocks.0.transformer_blocks.0.attn2.to_q"]
    g = torch.Generator().manual_seed(seed + 1)
    # per-column scales spread |dW * G| across the 1e-5 threshold, so scores vary between columns
    scale = torch.logspace(-5, 0, layer.out_features, dtype=torch.float64)[:, None]
    for kind in KINDS:
        A, B = layer.factors(kind)
        A.grad = torch.randn(A.shape, generator=g, dtype=torch.float64) * 1e-2
        B.grad = torch.randn(B.shape, generator=g, dtype=torch.float64) * scale
    return layer


def test_cone_scores_match_dense_formula(small_adapter):
    layer = layer_with_grads(small_adapter)
    merger = torch.rand(layer.out_features, dtype=torch.float64)
    merger[3] = 0.0
    for kind in KINDS:
        A, B = (t.detach() for t in layer.factors(kind))
        gA, gB = layer.grads(kind)
        dW = torch.einsum("or,ri->oi", B, A)
        G = (torch.einsum("or,ri->oi", B, gA) + torch.einsum("or,ri->oi", gB, A)) * merger[:, None]
        expected = torch.tensor([sum(float(abs(dW[o, j] * G[o, j]) > CONE_THRESHOLD)
                                     for j in range(layer.in_features)) / layer.in_features
                                 for o in range(layer.out_features)], dtype=torch.float64)
        scores = cone_scores(layer, kind, merger)
        assert scores.shape == (layer.out_features,)
        torch.testing.assert_close(scores.double(), expected)
        assert scores[3] == 0  # a zero merger zeroes the column's gradient
        assert len(set(scores.tolist())) > 3 and 0 < scores.mean() < 1  # the data is not degenerate


def test_cone_scores_use_each_kinds_own_factors_and_grads(small_adapter):
    layer = layer_with_grads(small_adapter)
    merger = torch.ones(layer.out_features, dtype=torch.float64)
    before = cone_scores(layer, "content", merger)
    with torch.no_grad():
        for grad in layer.grads("style"):  # style's gradient only
            grad *= 0
    assert torch.equal(cone_scores(layer, "content", merger), before)
    assert cone_scores(layer, "style", merger).sum() == 0


# ---- 3. recalibration on a real backward pass ----

def unmasked_backward(base, adapter, inputs, make_states, seed):
    """One step's gradients with masks off, as at a recalibration step."""
    for p in adapter.lora_parameters() + [adapter.gates.mergers]:
        p.grad = None
    adapter.gates.masks_enabled = False
    try:
        g = torch.Generator().manual_seed(seed)
        sample = torch.randn(inputs["sample"].shape, generator=g)
        cross = {"content_states": make_states(100 + seed), "style_states": make_states(200 + seed)}
        out = base.unet(**(inputs | {"sample": sample}), cross_attention_kwargs=cross).sample
        out.square().mean().backward()
    finally:
        adapter.gates.masks_enabled = True


def test_recalibrate_after_real_backward(tiny_base, unet_inputs, make_states):
    with UnZipLoRA(tiny_base.unet, rank=4) as adapter:
        masks = adapter.gates.masks
        layers = list(adapter.named_layers())
        k = {name: int(RATIO * layer.out_features) for name, layer in layers}
        assert min(k.values()) > 0
        previous = masks.clone()
        for round_ in range(1, 4):
            unmasked_backward(tiny_base, adapter, unet_inputs, make_states, seed=round_)
            recalibrate(adapter, RATIO)
            assert torch.equal(masks * previous, previous)  # masks only grow (OR)
            assert set(masks.unique().tolist()) <= {0.0, 1.0}
            for name, layer in layers:
                cols = masks[:, layer.columns()]
                for i, kind in enumerate(KINDS):
                    n = int(cols[i].sum())
                    if layer.role.is_full(kind):
                        assert n == layer.out_features, name
                    elif round_ == 1:
                        assert n == k[name], (name, kind)
                    else:
                        assert k[name] <= n <= round_ * k[name], (name, kind)
                if layer.role.exclusive:
                    assert (cols[0] * cols[1]).sum() == 0, name
            previous = masks.clone()


def test_recalibrate_shared_blocks_exclude_the_other_loras_columns(tiny_base, monkeypatch):
    """Content picks first; style skips content's columns; a later content pick skips style's."""
    wanted = {}  # kind -> scores for every layer (all 64 wide)

    def fake_scores(layer, kind, merger):
        return wanted[kind].clone()

    monkeypatch.setattr(importance, "cone_scores", fake_scores)
    adapter = UnZipLoRA(tiny_base.unet, rank=4)
    masks = adapter.gates.masks
    n = 64
    descending = torch.arange(n, 0, -1, dtype=torch.float32)  # column 0 scores highest
    wanted.update(content=descending, style=descending)
    recalibrate(adapter, RATIO)  # k = 6
    by_role = {}
    for name, layer in adapter.named_layers():
        by_role.setdefault(layer.role.name, layer)
    shared = masks[:, by_role["shared"].columns()]
    assert picked(shared[0]) == set(range(6))
    assert picked(shared[1]) == set(range(6, 12))
    content_block = masks[:, by_role["content"].columns()]
    assert picked(content_block[1]) == set(range(6))  # the full content LoRA does not block style
    style_block = masks[:, by_role["style"].columns()]
    assert picked(style_block[0]) == set(range(6))

    # now content prefers style's columns 6..11: it must skip them and take 12..17;
    # style then prefers content's columns 0..5 and 12..17: it must skip them and take 18..23
    content_prefers = torch.zeros(n)
    content_prefers[6:18] = torch.arange(12, 0, -1, dtype=torch.float32)
    style_prefers = torch.zeros(n)
    style_prefers[:6] = 100.0
    style_prefers[12:24] = torch.arange(12, 0, -1, dtype=torch.float32)
    wanted.update(content=content_prefers, style=style_prefers)
    recalibrate(adapter, RATIO)
    shared = masks[:, by_role["shared"].columns()]
    assert picked(shared[0]) == set(range(6)) | set(range(12, 18))
    assert picked(shared[1]) == set(range(6, 12)) | set(range(18, 24))
    # in a dedicated block nothing is excluded: style takes its top 6 again (0..5, already held)
    assert picked(masks[1, by_role["content"].columns()]) == set(range(6))


# ---- 4. the column schedule in a short fit ----

def check_fit_masks(result, ratio, recalibrations):
    masks, mergers = result.tensors["masks"], result.tensors["mergers"]
    names = sorted({key.rsplit(".", 1)[0] for key in masks})
    assert len(names) == 88 and set(mergers) == set(masks)
    for name in names:
        role = role_for(name, "sdxl")
        content, style = masks[f"{name}.content"], masks[f"{name}.style"]
        k = int(ratio * content.numel())
        for kind, mask in (("content", content), ("style", style)):
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            if role.is_full(kind):
                assert mask.sum() == mask.numel(), (name, kind)
            else:
                assert k <= mask.sum() <= recalibrations * k, (name, kind)
        if role.exclusive:
            assert (content * style).sum() == 0, name
        for kind in KINDS:
            m = mergers[f"{name}.{kind}"]
            assert m.min() >= 0 and m.max() <= 1


def test_fit_masks_follow_the_schedule(tiny_base, sample_image):
    result = fit(sample_image, fit_config(), base=tiny_base, progress=False)
    check_fit_masks(result, RATIO, 3)
    # the recalibrations ran at steps 0, 2, 4, and the later ones added columns beyond the first pick
    calibrated = [i for i, h in enumerate(result.history) if "mask_stats" in h]
    assert calibrated == [0, 2, 4]
    k = int(RATIO * 64)
    assert any(mask.sum() > k and mask.sum() < mask.numel() for mask in result.tensors["masks"].values())


def overlap_and_moved(result):
    masks, mergers = result.tensors["masks"], result.tensors["mergers"]
    moved_off_overlap, moved_on_overlap = [], 0
    for key in masks:
        name = key.rsplit(".", 1)[0]
        overlap = masks[f"{name}.content"] * masks[f"{name}.style"]
        moved = mergers[key] != 1
        if (moved & (overlap == 0)).any():
            moved_off_overlap.append(key)
        moved_on_overlap += int((moved & (overlap == 1)).sum())
    return moved_off_overlap, moved_on_overlap


def test_fit_mergers_move_only_on_overlap_columns_without_weight_decay(tiny_base, sample_image):
    result = fit(sample_image, fit_config(weight_decay=0.0), base=tiny_base, progress=False)
    off, on = overlap_and_moved(result)
    assert off == []
    assert on > 0  # the mergers do learn where both LoRAs hold a column


def test_fit_leaves_mergers_off_the_overlap_at_exactly_one(tiny_base, sample_image):
    """SPEC 4: merger gradients are kept only on overlap columns, so a merger off the overlap must stay
    exactly 1 (AdamW weight decay on the mergers would shrink them all; the mergers group has none)."""
    result = fit(sample_image, fit_config(), base=tiny_base, progress=False)
    off, _ = overlap_and_moved(result)
    assert off == [], f"{len(off)} mergers moved off the overlap, e.g. {off[:2]}"


# ---- 5./6. determinism and reuse of the base model ----

def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys()
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), (group, key)


def differs(a, b):
    return any(not torch.equal(a[g][k], b[g][k]) for g in a for k in a[g])


def test_fit_is_deterministic_per_seed(tiny_base, sample_image):
    first = fit(sample_image, fit_config(seed=0), base=tiny_base, progress=False)
    second = fit(sample_image, fit_config(seed=0), base=tiny_base, progress=False)
    assert_same_tensors(first.tensors, second.tensors)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    other = fit(sample_image, fit_config(seed=1), base=tiny_base, progress=False)
    assert differs(first.tensors, other.tensors)
    assert differs({"c": first.tensors["content"]}, {"c": other.tensors["content"]})


def test_reusing_base_model_leaks_nothing_between_fits(tiny_base, sample_image, tmp_path):
    unet = tiny_base.unet
    state = unet_state(unet)
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    config_a = fit_config(seed=0)
    config_b = fit_config(seed=1, content="zwx cat", style="oil painting", column_ratio=0.2)
    first = fit(sample_image, config_a, base=tiny_base, progress=False)
    assert_unet_restored(unet, state, processors)
    fit(sample_image, config_b, base=tiny_base, progress=False)
    assert_unet_restored(unet, state, processors)
    again = fit(sample_image, config_a, base=tiny_base, progress=False)
    assert_unet_restored(unet, state, processors)
    assert_same_tensors(first.tensors, again.tensors)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in again.history]


# ---- 7. divergence ----

def test_huge_learning_rate_raises_fit_diverged_and_restores_unet(tiny_base, sample_image):
    unet = tiny_base.unet
    state = unet_state(unet)
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    with pytest.raises(FitDivergedError) as info:
        fit(sample_image, fit_config(lr=1e30, merger_lr=1e30), base=tiny_base, progress=False)
    assert isinstance(info.value.step, int) and 1 <= info.value.step < 6  # step 0 starts from a sane init
    assert not torch.isfinite(torch.tensor(info.value.loss))
    assert_unet_restored(unet, state, processors)


def test_nan_unet_output_raises_with_its_step_and_restores_unet(tiny_base, sample_image):
    unet = tiny_base.unet
    state = unet_state(unet)
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    original = unet.forward
    calls = []

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the third step, step 2
            out.sample = out.sample * float("nan")
        return out

    unet.forward = forward
    try:
        with pytest.raises(FitDivergedError) as info:
            fit(sample_image, fit_config(), base=tiny_base, progress=False)
    finally:
        del unet.forward
    assert info.value.step == 2
    assert "step 2" in str(info.value)
    assert_unet_restored(unet, state, processors)
    # the base still trains normally afterwards
    result = fit(sample_image, fit_config(), base=tiny_base, progress=False)
    check_fit_masks(result, RATIO, 3)
