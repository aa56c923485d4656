"""The ONE place where logits become per-token and per-sequence log-probabilities.

log p(y_t | x, y_<t) = logit[y_t] - logsumexp(logits).  We gather the one logit we need
and compute the log-sum-exp in float32 in chunks of rows, so a float32 log-softmax over
the whole vocabulary ([N, T, V], 49k entries for SmolLM2) is never materialised.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, chunk_rows: int = 4):
    """Per-token log-probs of the tokens in ``input_ids`` under ``logits``.

    logits: [N, K, V] (any float dtype) for the LAST K positions of input_ids [N, T]
    (K = T for a full forward); loss_mask: [N, T] bool, True on the tokens to score.
    Position t's logits predict token t+1, so the result is aligned with tokens
    T-K+1..T-1: returns (logps [N, K-1] float32, mask [N, K-1] bool), zero where the
    mask is False.
    """
    start = input_ids.shape[1] - logits.shape[1] + 1
    targets = input_ids[:, start:]
    mask = loss_mask[:, start:]
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        lg = logits[start : start + chunk_rows, :-1]
        picked = torch.gather(lg, -1, targets[start : start + chunk_rows, :, None]).squeeze(-1).float()
        out.append(picked - torch.logsumexp(lg.float(), dim=-1))
    logps = torch.cat(out) * mask
    return logps, mask


def sequence_logps(logits, input_ids, loss_mask):
    """Sum of response-token log-probs and the token count per sequence: ([N], [N])."""
    logps, mask = token_logps(logits, input_ids, loss_mask)
    return logps.sum(-1), mask.sum(-1)


def reduce_logps(total: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """log pi(y|x) as a sum over response tokens, or their mean (the authors' point-wise code)."""
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / count.clamp(min=1)
    raise ValueError(f"unknown log-prob reduction {reduction!r} (expected 'sum' or 'mean')")


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays on a GPU that supports it and on CPUs with AMX or AVX512-BF16; elsewhere
    (e.g. AVX2-only CPUs) bf16 matrix products are emulated and many times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def use_bf16(setting, device: torch.device) -> bool:
    """Resolve ``train.bf16`` ("auto", True or False) for ``device``."""
    return bf16_is_fast(device) if setting == "auto" else bool(setting)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CPU or GPU; weights stay float32."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def logits_to_keep(loss_mask: torch.Tensor) -> int:
    """How many final positions need logits: from the one before the first response token.

    Prompt positions need no logits, and the output layer (49k x 576 for SmolLM2) is a
    fifth of the model's compute; with right padding the response tokens of every row
    lie in the last ``T - first_response + 1`` positions.
    """
    any_row = loss_mask.any(0)
    if not bool(any_row.any()):
        return loss_mask.shape[1]
    first = int(any_row.float().argmax())
    return loss_mask.shape[1] - max(first - 1, 0)


def forward_logps(model, batch: dict, *, bf16: bool, need_tokens: bool = False):
    """Run ``model`` on a collated batch; returns dict(sum [N], count [N], and tokens/mask)."""
    device = next(model.parameters()).device
    with autocast(device, bf16):
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            use_cache=False,
            logits_to_keep=logits_to_keep(batch["loss_mask"]),
        ).logits
    logps, mask = token_logps(logits, batch["input_ids"].to(device), batch["loss_mask"].to(device))
    out = {"sum": logps.sum(-1), "count": mask.sum(-1)}
    if need_tokens:
        out["tokens"], out["mask"] = logps, mask
    return out
