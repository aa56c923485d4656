"""Held-out metrics computed from per-sequence log-probs.

- perplexity of held-out positives: exp(sum of response-token NLL / number of response tokens)
- implicit-reward accuracy: on held-out (better, worse) pairs, the share with
  r(better) > r(worse), r = beta * (log pi - log pi_ref) (Eq. 4); ties are reported apart
  (before training every reward is exactly 0, so every pair ties)
- label accuracy: on held-out point-wise examples, the share whose reward has the sign of
  their label (r > 0 for positives, r < 0 for negatives)
- the method's own loss on the held-out units
"""

from __future__ import annotations

import math

import torch

from ulma.data.tokenize import Units, packed_width, pad_rows
from ulma.logprobs import cast_once, forward_logps, reduce_logps
from ulma.losses import group_mean
from ulma.methods import logp_reduction, loss_inputs


@torch.no_grad()
def table_logps(model, table, pad_id: int, batch_size: int, bf16: bool, rows: list[int] | None = None,
                desc: str = "log-probs", progress: bool = True, min_batches: int = 0, fused: bool = True,
                share_prompts: bool = True, multiple: int = 1) -> dict:
    """Sum and count of response-token log-probs for rows of a table: {"sum": [N], "count": [N]}.

    Rows are run longest first in batches of similar length (less padding); with
    ``share_prompts``, rows with the same prompt next to each other, so that a batch runs
    each prompt once (:func:`ulma.logprobs.pack_prompts`).  At least ``min_batches``
    forward passes are run (extra ones on row 0, discarded): with sharded weights (FSDP,
    ZeRO-3) every process must run the same number of forwards.  ``multiple``: shapes
    rounded up to it (:func:`ulma.logprobs.forward_logps`).
    """
    from tqdm.auto import tqdm

    rows = list(range(len(table))) if rows is None else rows
    total = torch.zeros(len(table), dtype=torch.float32)
    count = torch.zeros(len(table), dtype=torch.long)
    order = _longest_first(table, rows, share_prompts)
    was_training = model.training
    model.eval()
    done = []  # (rows, sums, counts), left on the device until the end: a copy to the CPU per
    # batch would make the CPU wait for the GPU every batch instead of queueing the next one
    with cast_once(model, bf16, fused) as head_weight:
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False,
                      dynamic_ncols=True):
            chunk = order[s : s + batch_size]
            out = forward_logps(model, pad_rows(table, chunk, pad_id, multiple), bf16=bf16, fused=fused,
                                share_prompts=share_prompts, head_weight=head_weight, multiple=multiple)
            done.append((chunk, out["sum"].float(), out["count"]))
        for _ in range(min_batches - math.ceil(len(order) / batch_size) if len(table) else 0):
            forward_logps(model, pad_rows(table, [0], pad_id, multiple), bf16=bf16, fused=fused,
                          head_weight=head_weight, multiple=multiple)
    for chunk, sums, counts in done:
        total[chunk] = sums.cpu()
        count[chunk] = counts.cpu()
    model.train(was_training)
    return {"sum": total, "count": count}


def _longest_first(table, rows: list[int], by_prompt: bool) -> list[int]:
    """Rows longest first; ``by_prompt``: groups of rows with one prompt, widest group first,
    where a group's width is that of its packed row (the prompt once, then every response),
    so that the packed rows of a batch have similar widths."""
    seqs = table.sequences
    if not by_prompt:
        return sorted(rows, key=lambda r: -len(seqs[r].input_ids))
    group: dict[tuple, int] = {}
    of = [group.setdefault(tuple(seqs[r].input_ids[: seqs[r].n_prompt]), len(group)) for r in rows]
    members: list[list] = [[] for _ in group]
    for r, g in zip(rows, of):
        members[g].append(seqs[r])
    width = [packed_width(m) for m in members]
    return [r for _, _, _, r in sorted((-width[g], g, -len(seqs[r].input_ids), r) for r, g in zip(rows, of))]


def perplexity(logps: dict, rows: list[int]) -> tuple[float, int]:
    """exp(mean NLL per response token) over ``rows``; returns (perplexity, token count)."""
    if not rows:
        return float("nan"), 0
    idx = torch.tensor(rows)
    tokens = int(logps["count"][idx].sum())
    return math.exp(-float(logps["sum"][idx].sum()) / max(tokens, 1)), tokens


def reward_accuracy(rewards: torch.Tensor, pairs: list[tuple[int, int]]) -> tuple[float, float]:
    """(share with r(better) > r(worse), share of exact ties)."""
    if not pairs:
        return float("nan"), float("nan")
    better = rewards[[p[0] for p in pairs]]
    worse = rewards[[p[1] for p in pairs]]
    return float((better > worse).float().mean()), float((better == worse).float().mean())


def label_accuracy(rewards: torch.Tensor, labelled: list[tuple[int, bool]]) -> float:
    """Share of point-wise examples whose reward has the label's sign: r > 0 for positives,
    r < 0 for negatives (sigma(r) > 1/2 iff z = 1, Eq. 6); r = 0 counts as wrong."""
    if not labelled:
        return float("nan")
    r = rewards[[i for i, _ in labelled]]
    pos = torch.tensor([p for _, p in labelled])
    return float(torch.where(pos, r > 0, r < 0).float().mean())


def evaluate(model, evalset, ref: dict, method, cfg, pad_id: int, bf16: bool, progress: bool = True,
             policy_logps: dict | None = None, state=None) -> dict:
    """All held-out metrics of one model against the reference log-probs ``ref``
    (``policy_logps``, when given, are the model's log-probs already computed)."""
    m = cfg.method
    pol = policy_logps
    if pol is None:
        rows = cfg.train.forward_rows(next(model.parameters()).device.type)
        pol = table_logps(model, evalset.table, pad_id, rows, bf16, desc="evaluate",
                          progress=progress, fused=cfg.train.fused_logps, share_prompts=cfg.train.share_prompts,
                          multiple=cfg.train.pad_to_multiple_of)
    how = logp_reduction(method, m)
    rewards = m.beta * (reduce_logps(pol["sum"], pol["count"], how) - reduce_logps(ref["sum"], ref["count"], how))
    ppl, tokens = perplexity(pol, evalset.positive_rows)
    acc, ties = reward_accuracy(rewards, evalset.pairs)
    out = {
        "perplexity": ppl,
        "perplexity_tokens": tokens,
        "reward_accuracy": acc,
        "reward_ties": ties,
        "pairs": len(evalset.pairs),
        "label_accuracy": label_accuracy(rewards, evalset.labelled_rows),
    }
    if not method.token_level and len(evalset.units):
        out["loss"] = heldout_loss(pol, ref, evalset.units, method, m, state)
    return out


def heldout_loss(pol: dict, ref: dict, units: Units, method, m, state=None) -> float:
    """The method's loss over all held-out units (the same reduction as in training);
    ``state``: the method's state (``Method.state``) as training left it."""
    cols = list(zip(*units.rows))
    rows = torch.tensor([r for col in cols for r in col] + units.kl_rows)
    how = logp_reduction(method, m)
    inp = loss_inputs(method, reduce_logps(pol["sum"][rows], pol["count"][rows], how),
                      reduce_logps(ref["sum"][rows], ref["count"][rows], how), torch.tensor(units.labels),
                      torch.tensor(units.positive), units.binary, state=state)
    losses, _ = method.loss(inp, m)
    n_pos, n_neg = units.group_weights(range(len(units)))
    weights = torch.tensor([units.weight(i) for i in range(len(units))])
    return float(group_mean(losses, inp.positive, n_pos=n_pos, n_neg=n_neg, weights=weights,
                            pos_weight=m.pos_weight, neg_weight=m.neg_weight, balance=m.balance))
