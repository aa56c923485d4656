"""Preference accuracy of a policy on pairs that humans ordered.

A trained policy pi ranks two answers to one prompt by its implicit reward
log pi(y|x) - log pi_ref(y|x) (DPO's reward, Eq. 5, without the positive factor beta,
which changes no order; log-probs summed over response tokens + EOS).  Its preference
accuracy is the share of human pairs where the answer humans preferred gets the higher
reward (a tie counts as wrong, and ties are reported apart), with a bootstrap interval
over pairs.  Unlike a judge's win rate it needs no judge: the labels are the humans'.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ulma.atomic import atomic_write_json
from ulma.data.tokenize import Tokenizer, build_units
from ulma.evaluation.metrics import table_logps


def pair_logps(model, tokenizer, pairs: list, *, max_length: int = 1024, batch_size: int = 8,
               progress: bool = True) -> dict:
    """{"chosen": [n], "rejected": [n]}: summed response log-probs of each Pair's two answers,
    tokenized as training tokenizes them (chat template, EOS, prompt cut from the left)."""
    if not pairs:
        return {"chosen": [], "rejected": []}
    units = build_units(pairs, Tokenizer(tokenizer, max_length))
    rows = sorted({r for unit in units.rows for r in unit})
    logps = table_logps(model, units.table, tokenizer.pad_token_id, batch_size, False, rows=rows,
                        desc="preference", progress=progress)
    return {"chosen": [float(logps["sum"][u[0]]) for u in units.rows],
            "rejected": [float(logps["sum"][u[1]]) for u in units.rows]}


def preference_accuracy(policy: dict, reference: dict, confidence: float = 0.95, seed: int = 0) -> dict:
    """Accuracy, ties and a bootstrap interval of the accuracy from the two models' pair log-probs."""
    from ulma.evaluation.winrates import bootstrap_interval

    margin = ((np.asarray(policy["chosen"]) - np.asarray(reference["chosen"]))
              - (np.asarray(policy["rejected"]) - np.asarray(reference["rejected"])))
    if len(margin) == 0:
        return {"accuracy": None, "ties": None, "pairs": 0, "ci": None, "mean_margin": None, "correct": []}
    right = (margin > 0).astype(float)
    return {"accuracy": float(right.mean()), "ties": float((margin == 0).mean()), "pairs": int(len(margin)),
            "ci": list(bootstrap_interval((right,), np.mean, confidence, seed=seed)),
            "mean_margin": float(margin.mean()), "correct": right.astype(int).tolist()}  # per pair: paired tests


def write_preference(policy: dict, reference: dict, out: Path, *, meta: dict, about: dict,
                     seconds: float | None = None) -> dict:
    """Write ``out/preference.json`` (the accuracy, its interval, the run's method / data set /
    seed in ``meta``, the ``seconds`` the log-probs took) and return it."""
    summary = {**preference_accuracy(policy, reference), "reward": "log pi - log pi_ref, summed over tokens",
               "meta": meta, "data": about, "seconds": None if seconds is None else round(seconds, 2)}
    atomic_write_json(Path(out) / "preference.json", summary)
    return summary
