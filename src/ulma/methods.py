"""Registry: method name -> (loss, the data it trains on, whether it needs pi_ref), and
the loop each method runs in (:data:`LOOPS`).

Adding a method is one function here, one registry line and one YAML file; the training
loop never branches on a method's name.  Each ``loss`` takes :class:`LossInputs` and the
method config and returns per-unit losses ``[B]`` and implicit rewards ``[B]`` (or None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ulma import losses as L


@dataclass
class LossInputs:
    """Per-unit tensors for one micro-batch.

    policy, ref: [N] log pi(y|x) (sum or mean over response tokens), N = B for point-wise
    units and 2B for pairs (chosen first, then rejected).  labels, positive: [B].
    tokens, mask: [N, T-1] per-token log-probs, only for token-level losses.
    """

    policy: torch.Tensor
    ref: Optional[torch.Tensor]
    labels: torch.Tensor
    positive: torch.Tensor
    binary: bool
    tokens: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Method:
    name: str
    loss: Callable
    kind: str  # "pointwise" | "pair" | "demonstration": what the data is converted to
    needs_reference: bool
    select: Optional[str] = None  # "positive" | "negative": train on that part only (ablations)
    token_level: bool = False
    help: str = ""


def _score_target(inp: LossInputs, m) -> torch.Tensor:
    """Regression target of the continuous losses (Eq. 9): target_scale * (z - target_offset).

    The defaults (0.5, 2.0) map a score in [0, 1] to [-1, 1], so the worst responses are
    pushed below the reference and the best above it; (0, 1) is the paper's literal (z - r)^2.
    """
    return m.target_scale * (inp.labels - m.target_offset)


def _binary_labels(inp: LossInputs) -> torch.Tensor:
    """z for the binary losses: the labels themselves, or positive/negative for scores."""
    return inp.labels if inp.binary else inp.positive.float()


def _sft(inp, m):
    return L.sft_loss(inp.policy), None


def _dpo(inp, m):
    b = inp.labels.shape[0]
    losses, chosen_r, rejected_r = L.dpo_loss(inp.policy[:b], inp.policy[b:], inp.ref[:b], inp.ref[b:], beta=m.beta)
    return losses, chosen_r - rejected_r


def _pointwise_dpo(inp, m):
    if inp.binary:
        return L.pointwise_dpo_loss(inp.policy, inp.ref, inp.labels, beta=m.beta, log_z=m.log_z)
    return _pointwise_dpo_mse(inp, m)


def _pointwise_dpo_mse(inp, m):
    return L.pointwise_dpo_mse_loss(inp.policy, inp.ref, _score_target(inp, m), beta=m.beta, log_z=m.log_z)


def _ulma(inp, m):
    if inp.binary:
        return L.ulma_loss(inp.policy, inp.ref, inp.labels, beta=m.beta, log_z=m.log_z)
    target = _score_target(inp, m)
    return L.ulma_continuous_loss(
        inp.policy, inp.ref, target, inp.positive, beta=m.beta, log_z=m.log_z, form=m.continuous_form
    )


def _unlearning(inp, m):
    return L.unlearning_loss(inp.policy), None


def _unlikelihood(inp, m):
    return L.unlikelihood_loss(inp.policy, _binary_labels(inp)), None


def _token_unlikelihood(inp, m):
    per_seq = L.token_unlikelihood_loss(inp.tokens, inp.mask, _binary_labels(inp))
    if m.logp_reduction == "mean":
        per_seq = per_seq / inp.mask.sum(-1).clamp(min=1)
    return per_seq, None


def _positive_dpo(inp, m):
    return L.positive_dpo_loss(inp.policy, inp.ref, beta=m.beta, log_z=m.log_z)


def _negative_dpo(inp, m):
    return L.negative_dpo_loss(inp.policy, inp.ref, beta=m.beta, log_z=m.log_z)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("sft", _sft, "demonstration", False, help="NLL on demonstrations / positives (§3.1)"),
        Method("dpo", _dpo, "pair", True, help="pair-wise DPO (Eq. 5)"),
        Method("pointwise_dpo", _pointwise_dpo, "pointwise", True, help="point-wise DPO: Eq. 8 (binary), Eq. 9 (scores)"),
        Method("pointwise_dpo_mse", _pointwise_dpo_mse, "pointwise", True, help="point-wise DPO, MSE form (Eq. 9)"),
        Method("ulma", _ulma, "pointwise", True, help="ULMA: NLL on positives + point-wise DPO on the rest (§4.3)"),
        Method("unlearning", _unlearning, "pointwise", False, select="negative", help="minimise log pi on negatives"),
        Method("unlikelihood", _unlikelihood, "pointwise", False, help="SFT on positives + Unlearning on negatives"),
        Method(
            "token_unlikelihood", _token_unlikelihood, "pointwise", False, token_level=True,
            help="Welleck et al. 2019: -log p on positive tokens, -log(1-p) on negative tokens",
        ),
        Method("positive_dpo", _positive_dpo, "pointwise", True, select="positive", help="ablation: Eq. 8 on positives"),
        Method("negative_dpo", _negative_dpo, "pointwise", True, select="negative", help="ablation: Eq. 8 on negatives"),
    ]
}


# The loop of each method: ulma.trainer's Trainer for the losses above; the methods that are
# not a loss over log-probs name their own, "module:function(cfg)", imported on use.
DEFAULT_LOOP = "ulma.trainer:train_policy"
LOOPS: dict[str, str] = {"reward": "ulma.rlhf.reward:train_reward", "rlhf": "ulma.rlhf.ppo:train_ppo"}
