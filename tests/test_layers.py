"""Tests for unziplora.layers (the dual LoRA, prompt routing, column gates) and unziplora.roles."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from unziplora.layers import TARGETS, ColumnGates, DualLoRALinear, PromptRoutingProcessor, UnZipLoRA
from unziplora.roles import KINDS, role_for

ROUTED_K = "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"  # a style-role block
ATTN2 = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"


def layer_named(adapter, name):
    return dict(adapter.named_layers())[name]


def set_gates(adapter, content_mask, style_mask, mergers=1.0):
    with torch.no_grad():
        adapter.gates.masks[0] = content_mask
        adapter.gates.masks[1] = style_mask
        adapter.gates.mergers.fill_(mergers)


def lora_delta(layer, x, content, style):
    """The LoRA part of a routed call: layer output minus the frozen base output."""
    layer.route = (content, style)
    try:
        with torch.no_grad():
            return layer(x) - layer.base_layer(x)
    finally:
        layer.route = None


def dual_linears(module):
    return [m for m in module.modules() if isinstance(m, DualLoRALinear)]


def target_types(unet):
    return {f"{name}.{t}": type(attn.get_submodule(t)) for name, attn in unet.named_modules()
            if isinstance(attn, Attention) for t in TARGETS}


def unet_out(unet, inputs, **cross):
    with torch.no_grad():
        return unet(**inputs, cross_attention_kwargs=cross or None).sample


# ---- 1. prompt routing on attn2.to_k ----

def test_routed_layer_feeds_content_lora_content_states_and_style_lora_style_states(tiny_base, make_states):
    x, x2 = make_states(0), make_states(1)
    c1, c2, s1, s2 = make_states(2), make_states(3), make_states(4), make_states(5)
    with UnZipLoRA(tiny_base.unet, rank=4) as adapter:
        layer = layer_named(adapter, ROUTED_K)
        assert layer.routed

        set_gates(adapter, 1.0, 0.0)  # content LoRA alone
        content = lora_delta(layer, x, c1, s1)
        A_c, B_c = layer.factors("content")
        torch.testing.assert_close(content, c1 @ A_c.detach().t() @ B_c.detach().t())
        assert torch.equal(lora_delta(layer, x, c1, s2), content)  # style states: no effect
        torch.testing.assert_close(lora_delta(layer, x2, c1, s1), content)  # combined states: no effect
        assert not torch.allclose(lora_delta(layer, x, c2, s1), content)

        set_gates(adapter, 0.0, 1.0)  # style LoRA alone
        style = lora_delta(layer, x, c1, s1)
        A_s, B_s = layer.factors("style")
        torch.testing.assert_close(style, s1 @ A_s.detach().t() @ B_s.detach().t())
        assert torch.equal(lora_delta(layer, x, c2, s1), style)
        torch.testing.assert_close(lora_delta(layer, x2, c1, s1), style)
        assert not torch.allclose(lora_delta(layer, x, c1, s2), style)

        set_gates(adapter, 1.0, 1.0)  # both: the two contributions add up
        torch.testing.assert_close(lora_delta(layer, x, c1, s1), content + style)


def test_routing_processor_routes_only_attn2_k_v_and_clears_route(tiny_base, make_states):
    context, c, s = make_states(1), make_states(2), make_states(3)
    with UnZipLoRA(tiny_base.unet, rank=4) as adapter:
        set_gates(adapter, 1.0, 1.0)
        attn = tiny_base.unet.get_submodule(ATTN2)
        hidden = torch.randn(1, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
        assert isinstance(attn.processor, PromptRoutingProcessor)
        seen = {}
        hooks = [attn.get_submodule(t).register_forward_hook(
            lambda mod, args, out, t=t: seen.__setitem__(t, (args[0], out))) for t in ("to_q", "to_k", "to_v")]
        try:
            with torch.no_grad():
                attn(hidden, encoder_hidden_states=context, content_states=c, style_states=s)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for t in ("to_k", "to_v"):
                layer = attn.get_submodule(t)
                assert layer.route is None  # cleared after the call
                inp, out = seen[t]
                assert torch.equal(inp, context)
                (A_c, B_c), (A_s, B_s) = layer.factors("content"), layer.factors("style")
                expected = layer.base_layer(context) + c @ A_c.t() @ B_c.t() + s @ A_s.t() @ B_s.t()
                torch.testing.assert_close(out, expected)
            q = attn.to_q  # not routed: both LoRAs see the hidden states
            (A_c, B_c), (A_s, B_s) = q.factors("content"), q.factors("style")
            expected = q.base_layer(hidden) + hidden @ (A_c.t() @ B_c.t() + A_s.t() @ B_s.t())
            torch.testing.assert_close(seen["to_q"][1], expected)


# ---- 2. routing through the whole UNet ----

def test_unet_output_depends_on_style_states_only_through_style_gates(tiny_base, unet_inputs, make_states):
    c1, c2, s1, s2 = make_states(10), make_states(11), make_states(12), make_states(13)
    unet = tiny_base.unet
    with UnZipLoRA(unet, rank=4) as adapter:
        adapter_gates = adapter.gates
        with torch.no_grad():
            adapter_gates.masks[0] = 1.0
            adapter_gates.masks[1] = 0.0
        base = unet_out(unet, unet_inputs, content_states=c1, style_states=s1)
        assert torch.equal(unet_out(unet, unet_inputs, content_states=c1, style_states=s2), base)
        assert not torch.allclose(unet_out(unet, unet_inputs, content_states=c2, style_states=s1), base)

        with torch.no_grad():
            adapter_gates.masks[1] = 1.0
        with_style = unet_out(unet, unet_inputs, content_states=c1, style_states=s1)
        assert not torch.allclose(unet_out(unet, unet_inputs, content_states=c1, style_states=s2), with_style)

        with torch.no_grad():
            adapter_gates.masks.zero_()
        plain = unet_out(unet, unet_inputs)
        assert torch.equal(unet_out(unet, unet_inputs, content_states=c2, style_states=s2), plain)


def test_layers_inside_a_unet_pass_use_their_own_gates(tiny_base, unet_inputs, make_states):
    """Each adapted linear, seen during a UNet forward, gives what it gives when called alone."""
    seen = []
    with UnZipLoRA(tiny_base.unet, rank=4) as adapter:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            adapter.gates.masks.copy_((torch.rand(adapter.gates.masks.shape, generator=g) > 0.5).float())
            adapter.gates.mergers.copy_(torch.rand(adapter.gates.mergers.shape, generator=g))
        hooks = [layer.register_forward_hook(
            lambda mod, args, out: seen.append((mod, args[0], mod.route, out))) for layer in adapter.layers.values()]
        try:
            unet_out(tiny_base.unet, unet_inputs, content_states=make_states(1), style_states=make_states(2))
        finally:
            for h in hooks:
                h.remove()
        assert {id(m) for m, *_ in seen} == {id(l) for l in adapter.layers.values()}
        with torch.no_grad():
            for layer, x, route, out in seen:
                assert (route is not None) == layer.routed
                layer.route = route
                try:
                    torch.testing.assert_close(layer(x), out)
                finally:
                    layer.route = None


# ---- 3./4. the fused rank-2r path and the gates ----

def randomize_gates(adapter, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.gates.masks.copy_((torch.rand(adapter.gates.masks.shape, generator=g) > 0.4).float())
        adapter.gates.mergers.copy_(torch.rand(adapter.gates.mergers.shape, generator=g))


def test_fused_forward_equals_explicit_two_lora_formula(small_adapter):
    adapter = small_adapter()
    randomize_gates(adapter)
    gates = adapter.gates
    checked = 0
    for name, layer in adapter.named_layers():
        if layer.routed:
            continue
        cols = layer.columns()
        assert (gates.masks[:, cols] == 0).any() and (gates.masks[:, cols] == 1).any()
        x = torch.randn(2, 7, layer.in_features)
        with torch.no_grad():
            out = layer(x).double()
            xd = x.double()
            expected = xd @ layer.base_layer.weight.double().t() + layer.base_layer.bias.double()
            for i, kind in enumerate(("content", "style")):
                A, B = (t.double() for t in layer.factors(kind))
                g = (gates.mergers[i, cols] * gates.masks[i, cols]).double()
                expected = expected + xd @ (g[:, None] * (B @ A)).t()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        checked += 1
    assert checked == 2  # to_q and to_out.0 (offset 36: a layer that does not start at column 0)


def test_masks_disabled_gates_are_the_mergers(small_adapter):
    adapter = small_adapter()
    randomize_gates(adapter)
    gates = adapter.gates
    layer = dict(adapter.named_layers())["blocks.0.transformer_blocks.0.attn2.to_out.0"]
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(gates.gates(), gates.mergers * gates.masks)
    with torch.no_grad():
        masked = layer(x)
        gates.masks_enabled = False
        assert torch.equal(gates.gates(), gates.mergers)
        unmasked = layer(x)
        gates.masks.fill_(1.0)
        gates.masks_enabled = True
        all_on = layer(x)
    torch.testing.assert_close(unmasked, all_on)
    assert not torch.allclose(unmasked, masked)


# ---- 5. orthogonality loss ----

def test_orthogonality_loss_is_mean_over_layers_of_per_layer_means(tiny_base):
    # (every tiny layer is 64 wide; the test below checks layers of unequal width)
    adapter = UnZipLoRA(tiny_base.unet, rank=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        adapter.gates.masks.copy_((torch.rand(adapter.gates.masks.shape, generator=g) > 0.5).float())
        adapter.gates.mergers.copy_(torch.rand(adapter.gates.mergers.shape, generator=g))
    per_layer = []
    for _, layer in adapter.named_layers():
        m, M = adapter.gates.mergers[:, layer.columns()], adapter.gates.masks[:, layer.columns()]
        per_layer.append((m[0] * M[0] * m[1] * M[1]).abs().mean())
    expected = torch.stack(per_layer).mean()
    loss = adapter.gates.orthogonality_loss()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert adapter.gates.mergers.grad is not None and adapter.gates.mergers.grad.abs().sum() > 0


def test_orthogonality_loss_zero_without_overlap_and_counts_layers_equally():
    # a mean over all 16 columns would give 4/16; the mean of the two layer means is (1 + 0) / 2
    gates = ColumnGates([4, 12])
    with torch.no_grad():
        gates.masks[0, :8] = 1.0
        gates.masks[1, 8:] = 1.0
    assert gates.orthogonality_loss() == 0
    with torch.no_grad():
        gates.masks.fill_(1.0)
        gates.masks[:, 4:] = 0.0  # full overlap in the small layer only
    torch.testing.assert_close(gates.orthogonality_loss(), torch.tensor(0.5))


# ---- 6. merger gradients only on overlap columns ----

def test_keep_overlap_grad_zeroes_merger_grads_off_overlap(tiny_base, unet_inputs, make_states):
    with UnZipLoRA(tiny_base.unet, rank=4) as adapter:
        gates = adapter.gates
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            gates.masks.copy_((torch.rand(gates.masks.shape, generator=g) > 0.5).float())
        cross = {"content_states": make_states(1), "style_states": make_states(2)}
        out = tiny_base.unet(**unet_inputs, cross_attention_kwargs=cross).sample
        (out.square().mean() + gates.orthogonality_loss()).backward()
        overlap = (gates.masks[0] * gates.masks[1]).bool().expand_as(gates.mergers)
        grad = gates.mergers.grad
        assert (grad[~overlap] != 0).any()  # before: a masked-on, non-overlap column has a gradient
        gates.keep_overlap_grad()
        assert torch.equal(grad[~overlap], torch.zeros_like(grad[~overlap]))
        assert (grad[overlap] != 0).float().mean() > 0.9


# ---- 7. detach puts the UNet back exactly ----

def test_detach_restores_unet_exactly(tiny_base, unet_inputs, make_states):
    unet = tiny_base.unet
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}  # nothing left attached
    # a processor other than the default, to see that detach restores what was there, not a default
    unet.set_attn_processor(AttnProcessor())
    try:
        types = target_types(unet)
        processors = dict(unet.attn_processors)
        state = {k: v.clone() for k, v in unet.state_dict().items()}
        before = unet_out(unet, unet_inputs)

        adapter = UnZipLoRA(unet, rank=4).attach()
        assert set(target_types(unet).values()) == {DualLoRALinear}
        assert len(dual_linears(unet)) == len(types) == len(adapter.layers)
        assert {type(p) for p in unet.attn_processors.values()} == {PromptRoutingProcessor}
        attached = unet_out(unet, unet_inputs, content_states=make_states(1), style_states=make_states(2))
        assert not torch.allclose(attached, before)  # the reference init is non-zero
        adapter.detach()

        assert target_types(unet) == types
        assert unet.attn_processors == processors  # the very same processor objects
        after_state = unet.state_dict()
        assert list(after_state) == list(state)
        assert all(torch.equal(after_state[k], v) for k, v in state.items())
        assert torch.equal(unet_out(unet, unet_inputs), before)
        assert not dual_linears(unet)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())


# ---- 8. initial masks and the role table ----

def test_initial_masks_follow_block_roles(tiny_base):
    adapter = UnZipLoRA(tiny_base.unet, rank=4)
    masks = adapter.gates.masks
    expected = {"content": (1.0, 0.0), "style": (0.0, 1.0), "shared": (0.0, 0.0)}
    seen = set()
    for name, layer in adapter.named_layers():
        assert layer.role is role_for(name, "sdxl")
        content, style = expected[layer.role.name]
        assert torch.equal(masks[0, layer.columns()], torch.full((layer.out_features,), content)), name
        assert torch.equal(masks[1, layer.columns()], torch.full((layer.out_features,), style)), name
        seen.add(layer.role.name)
    assert seen == set(expected)
    assert torch.equal(adapter.gates.mergers, torch.ones_like(adapter.gates.mergers))
    # the layers tile the flat gate tensors without gaps
    spans = sorted((l.columns().start, l.columns().stop) for _, l in adapter.named_layers())
    assert spans[0][0] == 0 and spans[-1][1] == masks.shape[1]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("name, role", [
    ("up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", "style"),
    ("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "content"),
    ("up_blocks.0.attentions.2.transformer_blocks.3.attn2.to_out.0", "content"),
    ("up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_v", "style"),
    ("mid_block.attentions.0.transformer_blocks.9.attn2.to_v", "shared"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", "shared"),
    ("down_blocks.2.attentions.1.transformer_blocks.7.attn2.to_q", "shared"),
])
def test_sdxl_role_table(name, role):
    assert role_for(name, "sdxl").name == role


@pytest.mark.parametrize("name", [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q",
    "up_blocks.0.attentions.10.transformer_blocks.0.attn1.to_q",
    "conv_in",
])
def test_role_table_unknown_name_raises_key_error(name):
    with pytest.raises(KeyError):
        role_for(name, "sdxl")


def test_role_table_is_data():
    assert role_for("conv_in", "none").name == "shared"
    assert role_for("blocks.3.attn", [(r"blocks\.3\.", "style")]).name == "style"


# ---- 9. init modes ----

def test_zeros_init_leaves_unet_output_unchanged(tiny_base, unet_inputs, make_states):
    unet = tiny_base.unet
    before = unet_out(unet, unet_inputs)
    with UnZipLoRA(unet, rank=4, init="zeros") as adapter:
        factors = [l.factors(kind) for l in adapter.layers.values() for kind in KINDS]
        assert all(torch.equal(B, torch.zeros_like(B)) for _, B in factors)
        assert all(A.abs().sum() > 0 for A, _ in factors)
        with torch.no_grad():
            adapter.gates.masks.fill_(1.0)
        torch.testing.assert_close(unet_out(unet, unet_inputs), before, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            unet_out(unet, unet_inputs, content_states=make_states(1), style_states=make_states(2)),
            before, atol=1e-6, rtol=0)


def test_reference_init_std_is_one_over_rank(tiny_base):
    rank = 4
    adapter = UnZipLoRA(tiny_base.unet, rank=rank, init="reference")
    A = torch.cat([l.factors(k)[0].detach().flatten() for l in adapter.layers.values() for k in KINDS])
    B = torch.cat([l.factors(k)[1].detach().flatten() for l in adapter.layers.values() for k in KINDS])
    for t in (A, B):
        assert abs(t.std().item() - 1 / rank) < 0.01
        assert abs(t.mean().item()) < 0.01
    # seeded: the same seed gives the same LoRAs, another seed others
    again = UnZipLoRA(tiny_base.unet, rank=rank, init="reference")
    other = UnZipLoRA(tiny_base.unet, rank=rank, init="reference", seed=1)
    first = next(iter(adapter.layers))
    for kind in KINDS:
        assert torch.equal(adapter.layers[first].factors(kind)[0], again.layers[first].factors(kind)[0])
        assert not torch.equal(adapter.layers[first].factors(kind)[0], other.layers[first].factors(kind)[0])


# ---- 10. one LoRA of a layer: the per-kind API (issue 33) ----

def test_each_lora_is_its_own_parameters_and_loads_alone(tiny_base):
    """factors() are the parameters themselves (what the optimizer holds); load_kind writes one LoRA, its mergers
    and masks, from what export.adapter_tensors gives, and leaves the other as it was; the parameter groups
    split the LoRA parameters by kind and own blocks, each parameter once."""
    from unziplora.export import adapter_tensors

    source = UnZipLoRA(tiny_base.unet, rank=3, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        source.gates.masks.copy_((torch.rand(source.gates.masks.shape, generator=g) > 0.5).float())
        source.gates.mergers.copy_(torch.rand(source.gates.mergers.shape, generator=g))
    saved = adapter_tensors(source, "fp32")
    target = UnZipLoRA(tiny_base.unet, rank=3, seed=2)
    untouched = adapter_tensors(target, "fp32")
    target.load_kind("style", saved["style"], saved["mergers"], saved["masks"])
    loaded = adapter_tensors(target, "fp32")
    for name, layer in target.named_layers():
        A, B = layer.factors("style")
        assert isinstance(A, torch.nn.Parameter) and A.shape == (3, layer.in_features)
        assert B.shape == (layer.out_features, 3)
        for key in (f"{name}.lora_A.weight", f"{name}.lora_B.weight"):
            assert torch.equal(loaded["style"][key], saved["style"][key])  # lora_B: its mask folded in, as saved
            assert torch.equal(loaded["content"][key], untouched["content"][key])
        assert torch.equal(layer.mask("style"), saved["masks"][f"{name}.style"])
        assert torch.equal(layer.merger("content"), untouched["mergers"][f"{name}.content"])
    first = next(iter(target.layers.values()))
    with pytest.raises(RuntimeError):
        first.set_factors("content", torch.zeros(2, first.in_features), torch.zeros(first.out_features, 2))


def test_unknown_init_raises(tiny_base):
    with pytest.raises(ValueError):
        UnZipLoRA(tiny_base.unet, rank=4, init="kaiming")
