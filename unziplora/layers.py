"""The dual LoRA: a content LoRA and a style LoRA on one frozen linear, gated per output column.

    y = W0 x + (m_c * M_c) . B_c A_c x_c + (m_s * M_s) . B_s A_s x_s        (SPEC sections 3-4)

x_c = x_s = x everywhere except attn2.to_k / attn2.to_v, where the content and style prompts are routed
in by `PromptRoutingProcessor`. Where both LoRAs see the same input they run as ONE rank-2r LoRA
(`[A_c x; A_s x]`, then `[B_c g_c | B_s g_s]`), so a step costs about what a single LoRA's step costs.
Dense delta-W is never built in the forward pass.

Each LoRA's factors are parameters of their own (`lora_A[kind]`, `lora_B[kind]`, as peft's LoraLayer keys its
adapters), stacked only for a pass; the rest of the package reaches one LoRA through `factors`, `grads`,
`set_factors`, `mask` and `merger` of a layer and `load_kind` / `lora_parameters` of the adapter, never
through the layout.

All mergers m and masks M of all layers live in two flat tensors owned by `ColumnGates`, so the
orthogonality loss, the merger clamp and the overlap-only merger gradient are one tensor op each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from .roles import KINDS, Role, role_for

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ROUTED = ("attn2.to_k", "attn2.to_v")  # where the three prompts are separated


class ColumnGates(nn.Module):
    """Per-output-column mergers (learned, in [0,1]) and binary masks of every adapted layer.

    Row 0 is the content LoRA, row 1 the style LoRA; layer i owns columns [offset_i, offset_i + n_i).
    """

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.sizes = list(sizes)
        total = sum(sizes)
        self.mergers = nn.Parameter(torch.ones(2, total))
        self.register_buffer("masks", torch.zeros(2, total))
        # Per-column weight 1 / (layers * columns of its layer): the loss is a mean of per-layer means.
        weights = torch.cat([torch.full((n,), 1.0 / (n * len(sizes))) for n in sizes])
        self.register_buffer("layer_mean_weights", weights)
        # set from the role table: where a LoRA may act at all (not "off"), and where the mergers may learn
        # (layers with a sparse LoRA; where both LoRAs are full there is no column separation to learn)
        self.register_buffer("reachable", torch.ones(2, total))
        self.register_buffer("mergeable", torch.ones(total))
        self.masks_enabled = True
        self._per_layer = None  # the gates split per layer, computed once per UNet forward pass

    def merger_values(self) -> torch.Tensor:
        """(2, columns): the m of every column, as the gates and the orthogonality loss read it (the learned
        mergers; the one place a variant of the mergers, such as the benchmark's patches, changes them)."""
        return self.mergers

    def gates(self) -> torch.Tensor:
        """m * M while masks are on; m alone (where the LoRA is not "off") during a recalibration step."""
        return self.merger_values() * (self.masks if self.masks_enabled else self.reachable)

    def begin_pass(self, *_) -> None:
        """Compute every layer's gates in one op and one split (whose backward is one concatenation),
        instead of a multiply and a full-size slice gradient in each of hundreds of layers. Runs before
        each UNet forward; the result stays valid until a merger or mask changes, so gradient
        checkpointing recomputes the layers with the very same tensors."""
        self._per_layer = (self._state(), self.gates().t().split(self.sizes))

    def end_pass(self, *_) -> None:
        self._per_layer = None

    def _state(self) -> tuple:
        return (self.mergers._version, self.masks._version, self.masks_enabled, torch.is_grad_enabled())

    def layer_gates(self, index: int, columns: slice) -> torch.Tensor:
        """(out, 2): one layer's gates, from the pass cache or (outside a UNet pass) computed directly."""
        if self._per_layer is not None and self._per_layer[0] == self._state():
            return self._per_layer[1][index]
        return self.gates()[:, columns].t()

    def orthogonality_loss(self) -> torch.Tensor:
        """mean over layers of mean_j |m_c M_c m_s M_s| (gradient reaches only the mergers)."""
        gated = self.merger_values() * self.masks
        return ((gated[0] * gated[1]).abs() * self.layer_mean_weights).sum()

    def overlap(self) -> torch.Tensor:
        return self.masks[0] * self.masks[1]

    @torch.no_grad()
    def keep_overlap_grad(self) -> None:
        """Mergers learn only where both LoRAs hold the column (SPEC section 4)."""
        if self.mergers.grad is not None:
            self.mergers.grad.mul_(self.overlap() * self.mergeable)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.mergers.clamp_(0.0, 1.0)


class DualLoRALinear(nn.Module):
    """A frozen linear plus a content and a style LoRA of rank r, each gated per output column.

    Parameters, per kind ("content", "style"): `lora_A[kind]` (r, in) and `lora_B[kind]` (out, r).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, role: Role, routed: bool, gates: ColumnGates,
                 index: int, offset: int, init: str = "reference", generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.rank, self.role, self.routed, self.index, self.offset = rank, role, routed, index, offset
        self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
        self._gates = [gates]  # a list: shared, not a registered submodule of every layer
        device = base_layer.weight.device
        self.lora_A = nn.ParameterDict({k: torch.empty(rank, self.in_features, device=device) for k in KINDS})
        self.lora_B = nn.ParameterDict({k: torch.empty(self.out_features, rank, device=device) for k in KINDS})
        self.reset_parameters(init, generator)
        self.route: tuple[torch.Tensor, torch.Tensor] | None = None  # set per call by the processor

    @torch.no_grad()
    def reset_parameters(self, init: str, generator: torch.Generator | None) -> None:
        # drawn for both LoRAs at once, [A_c; A_s] (2r, in) and [B_c, B_s] (out, 2, r): a seed gives the LoRAs it
        # always gave
        shape_A, shape_B = (2 * self.rank, self.in_features), (self.out_features, 2, self.rank)
        if init == "reference":  # both factors ~ N(0, (1/r)^2): each LoRA slightly non-zero at step 0
            A = torch.randn(shape_A, generator=generator) / self.rank
            B = torch.randn(shape_B, generator=generator) / self.rank
        elif init == "zeros":  # the usual LoRA init: A random, B zero, so the start equals the base
            bound = 1.0 / self.in_features ** 0.5
            A = torch.rand(shape_A, generator=generator) * 2 * bound - bound
            B = torch.zeros(shape_B)
        else:
            raise ValueError(f"unknown init {init!r}; use 'reference' or 'zeros'")
        for i, kind in enumerate(KINDS):
            self.set_factors(kind, A[i * self.rank:(i + 1) * self.rank], B[:, i])

    def column_gates(self) -> torch.Tensor:
        """(out, 2, 1): this layer's slice of the gates, shaped to scale B's rows."""
        return self._gates[0].layer_gates(self.index, self.columns()).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        gates = self.column_gates()  # (out, 2, 1)
        (A_c, B_c), (A_s, B_s) = self.factors("content"), self.factors("style")
        gated_c, gated_s = B_c * gates[:, 0], B_s * gates[:, 1]  # (out, r): the gates scale B's rows
        if self.route is None:  # one rank-2r LoRA: [B_c g_c | B_s g_s] [A_c x; A_s x]
            # (A_c x and A_s x apart: a concatenated [A_c; A_s] would be one more tensor the backward pass keeps)
            x = x.to(A_c.dtype)
            delta = F.linear(torch.cat([F.linear(x, A_c), F.linear(x, A_s)], -1), torch.cat([gated_c, gated_s], 1))
        else:
            content_x, style_x = (t.to(A_c.dtype) for t in self.route)
            delta = F.linear(F.linear(content_x, A_c), gated_c) + F.linear(F.linear(style_x, A_s), gated_s)
        return out + delta.to(out.dtype)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Both LoRAs as one rank-2r LoRA (new tensors, for a pass): A (2r, in) = [A_c; A_s], B (out, 2, r)."""
        return (torch.cat([self.lora_A[k] for k in KINDS]),
                torch.stack([self.lora_B[k] for k in KINDS], dim=1))

    # ---- one LoRA of the layer (`kind`: "content" or "style"): the only code that knows the layout ----
    def factors(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_k, B_k) of one LoRA, its parameters: A (r, in), B (out, r)."""
        return self.lora_A[kind], self.lora_B[kind]

    def grads(self, kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The gradients of (A_k, B_k), None where there is none."""
        A, B = self.factors(kind)
        return A.grad, B.grad

    @torch.no_grad()
    def set_factors(self, kind: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy (A_k, B_k) in (any dtype or device); a tensor of another shape raises RuntimeError."""
        for own, new in zip(self.factors(kind), (A, B)):
            if own.shape != new.shape:
                raise RuntimeError(f"{kind} LoRA factor of shape {tuple(new.shape)} for one of {tuple(own.shape)}")
            own.copy_(new)

    def mask(self, kind: str) -> torch.Tensor:
        """(out,): this layer's binary column mask of one LoRA, a view into the shared gates (writable)."""
        return self._gates[0].masks[KINDS.index(kind), self.columns()]

    def merger(self, kind: str) -> torch.Tensor:
        """(out,): this layer's column mergers of one LoRA, a view into the shared gates (writable)."""
        return self._gates[0].mergers[KINDS.index(kind), self.columns()]

    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.out_features)


class StackedDualLoRA(nn.Module):
    """One adapted linear while K fits train together in one batched UNet pass (`FitBatch`): sample k of the
    batch is fit k's, and each fit's own dual LoRA (its `DualLoRALinear`, parameters and gates) applies to its
    own sample. The K fits' factors are stacked for the pass (A (K, 2r, in), gated B (K, out, 2r)) and applied
    with two `bmm`s: no per-fit loop over layers."""

    def __init__(self, base_layer: nn.Linear, routed: bool, index: int, batch: "FitBatch"):
        super().__init__()
        self.base_layer, self.routed, self.index = base_layer, routed, index
        self._batch = [batch]  # a list: not a submodule
        self.fits: list[DualLoRALinear] = []  # a plain list: the fits' parameters stay theirs (not the UNet's)
        self.route: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        k, r = len(self.fits), self.fits[0].rank
        stacked = [f.stacked() for f in self.fits]
        A = torch.stack([a for a, _ in stacked])  # (K, 2r, in)
        B = torch.stack([b for _, b in stacked]) * self._batch[0].layer_gates(self.index)  # (K, out, 2, r)
        if self.route is None:
            delta = _per_fit(x, A, B.reshape(k, B.shape[1], 2 * r))
        else:
            content_x, style_x = self.route
            delta = _per_fit(content_x, A[:, :r], B[:, :, 0]) + _per_fit(style_x, A[:, r:], B[:, :, 1])
        return out + delta.to(out.dtype)


def _per_fit(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """B_k A_k x for the samples of fit k: x (K*m, ..., in) grouped by fit, A (K, r, in), B (K, out, r)."""
    h = x.to(A.dtype).reshape(A.shape[0], -1, x.shape[-1])
    y = torch.bmm(torch.bmm(h, A.transpose(1, 2)), B.transpose(1, 2))
    return y.reshape(*x.shape[:-1], B.shape[1])


class FitBatch:
    """The adapters of K fits of one UNet, attached together: each adapted linear becomes a `StackedDualLoRA`
    over the fits' own layers (one fit alone: its own `DualLoRALinear`s). `use(adapters)` changes which fits
    the next passes hold (a finished fit leaves); every adapter must be built on this UNet with one rank."""

    def __init__(self, unet: nn.Module, adapters: list["UnZipLoRA"]):
        self.unet, self.adapters = unet, list(adapters)
        self.slots = adapters[0]._slots
        self.stacked = [StackedDualLoRA(base, full_name.endswith(ROUTED), j, self)
                        for j, (full_name, _, _, base) in enumerate(self.slots)]
        self._saved_processors = None
        self._hooks = []
        self._gates = None  # every layer's gates of every fit, (K, out, 2) per layer, made once per UNet pass

    def _begin_pass(self, *_) -> None:
        """All fits' gates of all layers in one stack and one split per pass (not one op per fit per layer)."""
        gates = torch.stack([a.gates.gates() for a in self.adapters])  # (K, 2, columns)
        self._gates = gates.transpose(1, 2).split(self.adapters[0].gates.sizes, dim=1)

    def layer_gates(self, index: int) -> torch.Tensor:
        return self._gates[index].unsqueeze(-1)  # (K, out, 2, 1)

    def use(self, adapters: list["UnZipLoRA"]) -> None:
        if len({a.rank for a in adapters}) > 1:
            raise ValueError("fits trained together need one rank")
        layers = [list(a.layers.values()) for a in adapters]
        for j, stacked in enumerate(self.stacked):
            stacked.fits = [fit_layers[j] for fit_layers in layers]
        # one fit alone: its own layers in the slots, as `attach()` puts them (no wrapper call per layer)
        for (_, attn, target, _), module in zip(self.slots, layers[0] if len(adapters) == 1 else self.stacked):
            _set_child(attn, target, module)
        for hook in self._hooks:
            hook.remove()
        self.adapters = list(adapters)
        # one fit alone runs its own layers (their gates come from its own pass cache); several share one
        self._hooks = [self.unet.register_forward_pre_hook(
            adapters[0].gates.begin_pass if len(adapters) == 1 else self._begin_pass)]

    def __enter__(self) -> "FitBatch":
        self._saved_processors = self.unet.attn_processors
        self.unet.set_attn_processor(PromptRoutingProcessor())
        self.use(self.adapters)
        return self

    def __exit__(self, *exc) -> None:
        """The UNet back exactly as it was: original linears and attention processors."""
        for _, attn, target, base in self.slots:
            _set_child(attn, target, base)
        self.unet.set_attn_processor(self._saved_processors)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for adapter in self.adapters:
            adapter.gates.end_pass()
        self._gates = None


class PromptRoutingProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention, plus: hands the content and style prompt states to routed to_k/to_v.

    They arrive as `cross_attention_kwargs` (content_states=..., style_states=...), which diffusers passes
    through every block, gradient checkpointing included. Without them both LoRAs see the usual input.
    """

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, content_states=None, style_states=None, **kwargs):
        routed = [m for m in (attn.to_k, attn.to_v) if isinstance(m, (DualLoRALinear, StackedDualLoRA)) and m.routed]
        if content_states is not None and routed:
            for module in routed:
                module.route = (content_states, style_states)
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        finally:
            for module in routed:
                module.route = None


class UnZipLoRA(nn.Module):
    """The content + style LoRA pair of one fit, attached to (and detachable from) a UNet."""

    def __init__(self, unet: nn.Module, rank: int = 64, role_table="sdxl", init: str = "reference",
                 seed: int = 0):
        super().__init__()
        self.rank = rank
        targets = []  # (attention name, attention module, target name, base linear)
        for name, module in unet.named_modules():
            if isinstance(module, Attention) and ".transformer_blocks." in name:
                for target in TARGETS:
                    targets.append((name, module, target, module.get_submodule(target)))
        if not targets:
            raise ValueError("this UNet has no transformer-block attention to adapt")
        self.gates = ColumnGates([base.out_features for *_, base in targets])
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleDict()
        self._slots = []  # where each layer goes when attached
        offset = 0
        for index, (attn_name, attn, target, base) in enumerate(targets):
            full_name = f"{attn_name}.{target}"
            layer = DualLoRALinear(base, rank, role_for(full_name, role_table),
                                   routed=full_name.endswith(ROUTED), gates=self.gates, index=index,
                                   offset=offset, init=init, generator=generator)
            offset += base.out_features
            self.layers[full_name.replace(".", "__")] = layer
            self._slots.append((full_name, attn, target, base))
        with torch.no_grad():  # the full LoRA of a dedicated block uses every column from the start
            for layer in self.layers.values():
                cols, role = layer.columns(), layer.role
                for i, kind in enumerate(KINDS):
                    if role.is_full(kind):
                        self.gates.masks[i, cols] = 1.0
                    if getattr(role, kind) == "off":
                        self.gates.reachable[i, cols] = 0.0
                if not any(role.is_sparse(kind) for kind in KINDS):
                    self.gates.mergeable[cols] = 0.0
        self._unet = [unet]
        self._batch: FitBatch | None = None

    def named_layers(self):
        for (full_name, *_), layer in zip(self._slots, self.layers.values()):
            yield full_name, layer

    def lora_parameters(self, kind: str | None = None) -> list[nn.Parameter]:
        """The LoRA factors of every layer: of one LoRA, or of both."""
        kinds = KINDS if kind is None else (kind,)
        return [p for layer in self.layers.values() for k in kinds for p in layer.factors(k)]

    @torch.no_grad()
    def load_kind(self, kind: str, state: dict[str, torch.Tensor], mergers: dict[str, torch.Tensor],
                  masks: dict[str, torch.Tensor]) -> None:
        """One LoRA of every layer from a peft-format state dict (`<layer>.lora_A.weight`, `.lora_B.weight`) and
        its mergers and masks (`<layer>.<kind>`), as `export.adapter_tensors` gives them; the other LoRA is left
        as it is. A missing key raises KeyError, a tensor of another shape RuntimeError."""
        for name, layer in self.named_layers():
            layer.set_factors(kind, state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"])
            layer.merger(kind).copy_(mergers[f"{name}.{kind}"])
            layer.mask(kind).copy_(masks[f"{name}.{kind}"])

    def attach(self) -> "UnZipLoRA":
        self._batch = FitBatch(self._unet[0], [self]).__enter__()
        return self

    def detach(self) -> None:
        """Put the UNet back exactly as it was: original linears and attention processors."""
        if self._batch is not None:
            self._batch.__exit__()
            self._batch = None
        self.gates.end_pass()

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()


def _set_child(parent: nn.Module, dotted: str, child: nn.Module) -> None:
    *path, last = dotted.split(".")
    for part in path:
        parent = getattr(parent, part) if not part.isdigit() else parent[int(part)]
    if last.isdigit():
        parent[int(last)] = child
    else:
        setattr(parent, last, child)
