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
        with torch.autocast(hidden.device.type, enabled=False):  # float32 also inside the policy's bf16 autocast
            return self.linear(hidden.float()).squeeze(-1)


class PolicyWithValueHead(nn.Module):
    """The policy and its value head as one module: what PPO trains (one DDP wrapper over
    both, so the value head's gradients are averaged with the policy's) and what it saves:
    ``save_pretrained`` writes the policy (adapter or full model, loadable with
    ``AutoPeftModelForCausalLM`` / ``AutoModelForCausalLM``) and the value head."""

    def __init__(self, policy, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, input_ids, attention_mask, position_ids, n_resp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, n_resp + 1, V], values [N, n_resp])`` of the last ``n_resp + 1``
        positions: the logits at position t predict token t + 1, and V(s_t) is read at the
        same position (the state before the token is chosen), for the last n_resp tokens."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=n_resp + 1, output_hidden_states=True, use_cache=False)
        return out.logits, self.value_head(out.hidden_states[-1][:, -n_resp - 1 : -1])

    def save_pretrained(self, folder, **kwargs) -> None:
        from safetensors.torch import save_file

        self.policy.save_pretrained(folder, **kwargs)
        state = {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(state, str(Path(folder) / VALUE_HEAD_FILE))


def load_value_head(value_head: ValueHead, folder: Path) -> None:
    """Restore a saved value head in place."""
    from safetensors.torch import load_file

    value_head.load_state_dict(load_file(str(Path(folder) / VALUE_HEAD_FILE)))
