"""What a training forward keeps for its backward: the same values, less kept.

A SiLU-gated MLP (Llama, Mistral, Qwen, SmolLM...) computes
``down_proj(silu(gate_proj(x)) * up_proj(x))``.  Run eagerly, autograd keeps three
[tokens, MLP width] tensors of each layer to the backward: ``gate`` (for silu's
gradient), ``silu(gate)`` and ``up`` (for the product's).  :class:`SiluMul` keeps ``gate``
and ``up`` and recomputes ``silu(gate)`` in the backward: an elementwise op, cheap beside the
layer's matrix products, for one of the largest tensors a layer keeps.

Dropout on a CPU (LoRA's, before each adapter) keeps its scaled mask in the input's dtype
(float32 for LoRA's inputs); CUDA's fused kernel keeps a bool mask.
:class:`MaskDropout` keeps the bool mask on a CPU too and rebuilds the scaled one in the
backward.

A LoRA adapter (PEFT's ``lora.Linear``) computes ``base(x) + B(A(dropout(x))) * scaling``.
Eagerly each adapter keeps its dropout mask, a bf16 copy of the dropped input for A's
gradient and B's input, though q, k and v read the same ``x``.  :func:`_lean_lora_forward`
runs the adapter branch under ``torch.utils.checkpoint``: it keeps ``x`` (one tensor for q, k
and v) and the mask (as bits on a CPU; as the random state on CUDA, whose fused kernel redraws
it cheaply), and reruns dropout, A and B (rank-r products, cheap beside the base layer's) in
the backward.

Values and gradients are those of the eager ops, bit for bit (the same kernels, in the same
order, drawing the same random numbers).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# The forward of transformers' Llama-family MLPs, whitespace removed.  Only a module whose
# class runs exactly this is changed: any other code (a bias, a scaling, a different
# activation) keeps its own forward.
_GATED_FORWARDS = {
    "defforward(self,x):down_proj=self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))returndown_proj",
    "defforward(self,x):returnself.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))",
}


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping ``gate`` and ``up`` (not silu(gate)) for the backward.

    d/d up = grad * silu(gate);  d/d gate = silu'(gate) * grad * up, with silu'(g) =
    s(g) (1 + g (1 - s(g))) for the logistic s, as ``aten.silu_backward`` computes it.
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # in place: no third MLP-wide tensor beside gate and up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = F.silu(gate).mul_(grad) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act) -> bool:
    """``act`` computes silu (torch's SiLU, transformers' SiLUActivation...), checked on values."""
    if not isinstance(act, torch.nn.Module):
        return False
    probe = torch.linspace(-4, 4, 9)
    with torch.no_grad():
        return torch.equal(act(probe), F.silu(probe))


def _class_forward(module: torch.nn.Module) -> str | None:
    """The source of ``module``'s class forward, whitespace removed; None where it cannot be
    read or the module has a forward of its own (patched already)."""
    if "forward" in module.__dict__:
        return None
    try:
        return re.sub(r"\s+", "", inspect.getsource(type(module).forward))
    except (OSError, TypeError):
        return None


def _is_gated_silu_mlp(module: torch.nn.Module) -> bool:
    return _is_silu(getattr(module, "act_fn", None)) and _class_forward(module) in _GATED_FORWARDS


class _BoolMaskDropout(torch.autograd.Function):
    """CPU dropout as ``torch.nn.functional.dropout`` computes it (a mask drawn with
    ``bernoulli_(1 - p)`` in the input's dtype, divided by 1 - p, times the input), keeping
    the mask as bool: the backward multiplies by the same scaled mask, rebuilt."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
        ctx.save_for_backward(noise != 0)
        ctx.p = p
        return x * noise

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad has the input's dtype, as the mask had
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype).div_(1 - ctx.p), None


class MaskDropout(torch.nn.Dropout):
    """``nn.Dropout`` that keeps a bool mask for the backward on a CPU (elsewhere, and when
    not training, it is ``nn.Dropout``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace or not 0 < self.p < 1 or x.device.type != "cpu" \
                or not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        return _BoolMaskDropout.apply(x, self.p)


# SHA-256 of PEFT's ``lora.Linear.forward`` source, whitespace removed, for the versions whose
# plain path :func:`_lean_lora_forward` repeats; any other version keeps its own forward.
_PEFT_LORA_FORWARDS = {
    "6258e443c7a12107",  # peft 0.21
}


def _is_known_lora_linear(module: torch.nn.Module) -> bool:
    if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")):
        return False
    source = _class_forward(module)
    return source is not None and hashlib.sha256(source.encode()).hexdigest()[:16] in _PEFT_LORA_FORWARDS


def _plain_adapter(layer, kwargs: dict) -> str | None:
    """The one active vanilla LoRA adapter of ``layer`` when its forward takes PEFT's plain
    path (no keyword arguments) with a graph to record; else None (PEFT's own forward runs)."""
    active = [a for a in layer.active_adapters if a in layer.lora_A.keys()]
    if (not torch.is_grad_enabled() or layer.disable_adapters or layer.merged or len(active) != 1
            or active[0] in getattr(layer, "lora_variant", {}) or kwargs):
        return None
    return active[0]


def _lora_branch(x: torch.Tensor, keep: torch.Tensor | None, layer, adapter: str) -> torch.Tensor:
    """``lora_B(lora_A(dropout(x))) * scaling`` as PEFT computes it; ``keep``: dropout's mask
    drawn already, as bits (:func:`pack_bits`), else the adapter's dropout module draws it."""
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    x = layer._cast_input_dtype(x, lora_A.weight.dtype)
    if keep is None:
        dropped = layer.lora_dropout[adapter](x)
    else:  # as torch's CPU dropout: x times the mask scaled by 1 / (1 - p)
        dropped = x * unpack_bits(keep, x.shape).to(x.dtype).div_(1 - layer.lora_dropout[adapter].p)
    return lora_B(lora_A(dropped)) * layer.scaling[adapter]


def _draws_on_cpu(dropout: torch.nn.Module, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and isinstance(dropout, torch.nn.Dropout) and dropout.training
            and not dropout.inplace and 0 < dropout.p < 1)


def _lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's plain LoRA forward with the adapter branch recomputed in the backward.  On a
    CPU, dropout's mask is drawn here, as torch's CPU dropout draws it, and kept as bits: a
    CPU draws slowly (more time than the rank-r products), so it is not drawn twice.
    Elsewhere (CUDA's fused dropout) the random state is kept and the mask redrawn."""
    adapter = _plain_adapter(self, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    self._check_forward_args(x, *args)
    result = self.base_layer(x, *args)
    dropout = self.lora_dropout[adapter]
    if _draws_on_cpu(dropout, x):
        keep = pack_bits(torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - dropout.p))
        branch = checkpoint(_lora_branch, x, keep, self, adapter, use_reentrant=False, preserve_rng_state=False)
    else:
        branch = checkpoint(_lora_branch, x, None, self, adapter, use_reentrant=False)
    return (result + branch).to(result.dtype)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bits, 8 elements a byte (the first in the lowest bit)."""
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(torch.uint8).view(-1, 8) << _SHIFTS.to(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """:func:`pack_bits` undone: the bool tensor of ``shape``."""
    flat = (bits[:, None] >> _SHIFTS.to(bits.device)) & 1
    return flat.view(-1)[: math.prod(shape)].view(shape).bool()


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def lean_activations(model: torch.nn.Module) -> dict:
    """Make ``model`` keep less for its backward at the same values, in place (before a
    compile or a copy of the model): every SiLU-gated MLP computes its product with
    :class:`SiluMul`, every ``nn.Dropout`` becomes a :class:`MaskDropout`.  Returns how
    many of each were changed."""
    n = {"gated_mlps": 0, "dropouts": 0}
    for module in list(model.modules()):
        if _is_gated_silu_mlp(module):
            module.forward = types.MethodType(_lean_forward, module)
            n["gated_mlps"] += 1
        for name, child in module.named_children():
            if type(child) is torch.nn.Dropout:
                setattr(module, name, MaskDropout(child.p, child.inplace))
                n["dropouts"] += 1
    return n


def recompute_lora(model: torch.nn.Module) -> int:
    """Make every LoRA Linear of ``model`` (of a known PEFT version) recompute its adapter
    branch in the backward (:func:`_lean_lora_forward`), in place; returns how many."""
    n = 0
    for module in list(model.modules()):
        if _is_known_lora_linear(module):
            module.forward = types.MethodType(_lean_lora_forward, module)
            n += 1
    return n


def keep_less(model: torch.nn.Module, train, lora, device_type: str) -> None:
    """What a training forward of ``model`` keeps, as ``train`` (a TrainConfig) sets it:
    ``lean_activations``; ``gradient_checkpointing`` (non-reentrant: it works with LoRA's
    frozen inputs and DDP's no_sync); ``recompute_lora`` (auto: on unless LoRA has dropout on
    a CPU, where rebuilding the dropped input from the mask's bits slows a step; never under
    gradient checkpointing, which reruns whole layers already).  ``lora``: a LoraConfig."""
    if train.lean_activations:
        lean_activations(model)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    on = train.recompute_lora
    if on == "auto":
        on = device_type != "cpu" or not (lora.enabled and lora.dropout > 0)
    if on:
        recompute_lora(model)
