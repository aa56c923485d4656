"""What a training forward keeps for its backward: gated MLPs that keep one tensor less.

A SiLU-gated MLP (Llama, Mistral, Qwen, SmolLM...) computes
``down_proj(silu(gate_proj(x)) * up_proj(x))``.  Run eagerly, autograd keeps three
[tokens, MLP width] tensors of each layer to the backward: ``gate`` (for silu's
gradient), ``silu(gate)`` and ``up`` (for the product's).  :class:`SiluMul` keeps ``gate``
and ``up`` and recomputes ``silu(gate)`` in the backward, an elementwise op: for a model
whose MLP is 4x its width, a sixth of what a layer keeps, at no measurable cost.
Values and gradients are those of the eager ops (the same kernels, in the same order).
"""

from __future__ import annotations

import inspect
import re
import types

import torch
import torch.nn.functional as F

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


def _is_gated_silu_mlp(module: torch.nn.Module) -> bool:
    if "forward" in module.__dict__ or not _is_silu(getattr(module, "act_fn", None)):
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return re.sub(r"\s+", "", source) in _GATED_FORWARDS


def lean_gated_mlps(model: torch.nn.Module) -> int:
    """Make every SiLU-gated MLP of ``model`` compute its product with :class:`SiluMul`
    (in place, before a compile or a copy of the model); returns how many were changed."""
    n = 0
    for module in model.modules():
        if _is_gated_silu_mlp(module):
            module.forward = types.MethodType(_lean_forward, module)
            n += 1
    return n
