"""The value head of PPO: V(s_t) = w . h_t + b on the policy's last hidden state.

It shares the policy's trunk (and its LoRA adapters), as in the classic PPO setup for
language models, and is saved beside the adapter as ``value_head.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """``[..., H]`` hidden states -> ``[...]`` values, in float32.

    Starts at exactly 0 (w = 0, b = 0): no random value noise in the first advantages,
    and the gradient w.r.t. w (= h) is not zero, so it still learns.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class PolicyWithValueHead(nn.Module):
    """What a PPO run saves: ``save_pretrained`` writes the policy (adapter or full model,
    loadable with ``AutoPeftModelForCausalLM`` / ``AutoModelForCausalLM``) and the value head."""

    def __init__(self, policy, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def save_pretrained(self, folder, **kwargs) -> None:
        from safetensors.torch import save_file

        self.policy.save_pretrained(folder, **kwargs)
        state = {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(state, str(Path(folder) / VALUE_HEAD_FILE))


def load_value_head(value_head: ValueHead, folder: Path) -> None:
    """Restore a saved value head in place."""
    from safetensors.torch import load_file

    value_head.load_state_dict(load_file(str(Path(folder) / VALUE_HEAD_FILE)))
