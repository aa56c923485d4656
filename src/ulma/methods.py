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
    kl_policy, kl_ref: [B] log-probs of each unit's mismatched (x_i, y_j) row, only for
    methods with ``kl_rows`` (KTO's reference point).
    state: the method's state carried across steps (``Method.state``), e.g. BCO's running
    mean; read-only here (the loop updates it after each optimizer step).
    """

    policy: torch.Tensor
    ref: Optional[torch.Tensor]
    labels: torch.Tensor
    positive: torch.Tensor
    binary: bool
    tokens: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    kl_policy: Optional[torch.Tensor] = None
    kl_ref: Optional[torch.Tensor] = None
    state: Optional["RunningMean"] = None


class RunningMean:
    """A mean over every reward seen so far, kept across optimizer steps (BCO's ``delta``).

    The loop calls :meth:`observe` with each micro-batch's rewards ``[B]`` (and the weight
    of its units: 0 for a stand-in) and, once per optimizer step, :meth:`commit` with a
    function that sums a tensor over processes: the mean then moves once per step, by the
    rewards of the whole step on every process, so it does not depend on how a step is
    split into micro-batches or processes.  The loss of a step reads the mean of the
    steps before it (TRL's ``RunningMoments`` also folds in the current micro-batch first;
    at step 0 both start from the rewards of the untrained policy, which are 0).
    :meth:`state_dict` goes into the checkpoint, so a resumed run continues exactly.
    """

    def __init__(self):
        self.total, self.count = 0.0, 0.0
        self._pending: Optional[torch.Tensor] = None

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def observe(self, rewards: torch.Tensor, weight: float = 1.0) -> None:
        r = rewards.detach().double()
        step = torch.stack([r.sum() * weight, torch.tensor(float(r.numel()) * weight, dtype=torch.float64,
                                                           device=r.device)])
        self._pending = step if self._pending is None else self._pending + step

    def commit(self, sum_over_processes: Callable = lambda t: t) -> None:
        if self._pending is None:
            return
        total, count = sum_over_processes(self._pending).tolist()
        self.total, self.count, self._pending = self.total + total, self.count + count, None

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        self.total, self.count, self._pending = float(d["total"]), float(d["count"]), None


@dataclass(frozen=True)
class Method:
    name: str
    loss: Callable
    kind: str  # "pointwise" | "pair" | "demonstration": what the data is converted to
    needs_reference: bool
    select: Optional[str] = None  # "positive" | "negative": train on that part only (ablations)
    token_level: bool = False
    help: str = ""
    # What "method.logp_reduction: auto" means for this method: the authors' code sums a
    # response's token log-probs for pair-wise DPO and averages them for the point-wise losses.
    authors_reduction: str = "sum"
    # Each unit also gets a mismatched (x_i, y_j) row (ulma.data.prepare.add_kl_rows), scored by
    # the policy and the reference alongside the unit: inp.kl_policy / inp.kl_ref (KTO).
    kl_rows: bool = False
    # A factory of state carried across optimizer steps (inp.state; saved in checkpoints).
    state: Optional[Callable] = None


def loss_inputs(method: Method, policy, ref, labels, positive, binary, tokens=None, mask=None,
                state=None) -> LossInputs:
    """:class:`LossInputs` from the log-probs of a batch's rows (``[N]``, as
    :func:`ulma.data.tokenize.collate` lays them out): with ``method.kl_rows`` the last
    ``B`` rows are the units' mismatched KL rows, split off into ``kl_policy`` / ``kl_ref``."""
    kl_policy = kl_ref = None
    if method.kl_rows:
        b = labels.shape[0]
        policy, kl_policy = policy[:-b], policy[-b:]
        ref, kl_ref = ref[:-b], ref[-b:]
    return LossInputs(policy, ref, labels, positive, binary, tokens, mask, kl_policy, kl_ref, state)


def logp_reduction(method: Method, m) -> str:
    """The reduction of ``log pi(y|x)`` over response tokens for ``method``: ``m.logp_reduction``,
    or with ``auto`` the authors' choice for the method (``Method.authors_reduction``)."""
    return method.authors_reduction if m.logp_reduction == "auto" else m.logp_reduction


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
    if logp_reduction(METHODS["token_unlikelihood"], m) == "mean":
        per_seq = per_seq / inp.mask.sum(-1).clamp(min=1)
    return per_seq, None


def _positive_dpo(inp, m):
    return L.positive_dpo_loss(inp.policy, inp.ref, beta=m.beta, log_z=m.log_z)


def _negative_dpo(inp, m):
    return L.negative_dpo_loss(inp.policy, inp.ref, beta=m.beta, log_z=m.log_z)


def _kto(inp, m):
    # desirable / undesirable weights: method.pos_weight / neg_weight, applied by the loop's
    # reduction (group_mean); TRL's plain mean of the weighted losses is balance: false.
    return L.kto_loss(inp.policy, inp.ref, _binary_labels(inp), inp.kl_policy, inp.kl_ref, beta=m.beta)


def _bco(inp, m):
    delta = inp.state.mean if inp.state is not None else 0.0
    return L.bco_loss(inp.policy, inp.ref, _binary_labels(inp), beta=m.beta, delta=delta)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        # authors_reduction "mean" for SFT: their SFT is Hugging Face's token-mean cross-entropy
        Method("sft", _sft, "demonstration", False, authors_reduction="mean",
               help="NLL on demonstrations / positives (§3.1)"),
        Method("dpo", _dpo, "pair", True, help="pair-wise DPO (Eq. 5)"),
        Method("pointwise_dpo", _pointwise_dpo, "pointwise", True, authors_reduction="mean",
               help="point-wise DPO: Eq. 8 (binary), Eq. 9 (scores)"),
        Method("pointwise_dpo_mse", _pointwise_dpo_mse, "pointwise", True, authors_reduction="mean",
               help="point-wise DPO, MSE form (Eq. 9)"),
        Method("ulma", _ulma, "pointwise", True, authors_reduction="mean",
               help="ULMA: NLL on positives + point-wise DPO on the rest (§4.3)"),
        Method("unlearning", _unlearning, "pointwise", False, select="negative", authors_reduction="mean",
               help="minimise log pi on negatives"),
        Method("unlikelihood", _unlikelihood, "pointwise", False, authors_reduction="mean",
               help="SFT on positives + Unlearning on negatives"),
        Method(
            "token_unlikelihood", _token_unlikelihood, "pointwise", False, token_level=True,
            help="Welleck et al. 2019: -log p on positive tokens, -log(1-p) on negative tokens",
        ),
        Method("positive_dpo", _positive_dpo, "pointwise", True, select="positive", authors_reduction="mean",
               help="ablation: Eq. 8 on positives"),
        Method("negative_dpo", _negative_dpo, "pointwise", True, select="negative", authors_reduction="mean",
               help="ablation: Eq. 8 on negatives"),
        # not in the paper: TRL's unpaired losses, for comparison
        Method("kto", _kto, "pointwise", True, kl_rows=True,
               help="KTO (Ethayarajh et al. 2024), as TRL: reference point from mismatched rows; not in the paper"),
        Method("bco", _bco, "pointwise", True, state=RunningMean,
               help="BCO (Jung et al. 2024), as TRL without UDM: Eq. 8 shifted by the running mean reward; "
                    "not in the paper"),
    ]
}


# The loop of each method: ulma.trainer's Trainer for the losses above; the methods that are
# not a loss over log-probs name their own, "module:function(cfg)", imported on use.
DEFAULT_LOOP = "ulma.trainer:train_policy"
LOOPS: dict[str, str] = {"reward": "ulma.rlhf.reward:train_reward", "rlhf": "ulma.rlhf.ppo:train_ppo"}
