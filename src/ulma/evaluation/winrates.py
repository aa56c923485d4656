"""Win / tie / lose rates and their 95% confidence intervals.

- Over training runs (the paper: 3 runs, 95% CI): a t-interval of the per-run values,
  mean ± t_{(1+c)/2, n-1} · s / √n (``scipy.stats.t``).
- Within one run: a percentile bootstrap over prompts (``scipy.stats.bootstrap``), so
  a single run still says how far its numbers can be trusted.

"win & tie" is the paper's Table 2 score: the share of prompts where the model's answer
is at least as good as the reference.  Unparseable verdicts are left out of the rates
and counted apart.
"""

from __future__ import annotations

import math

import numpy as np

OUTCOMES = ("win", "tie", "lose")
RATES = ("win", "tie", "lose", "win_tie")


def rates(outcomes: list) -> dict:
    """{win, tie, lose, win_tie} shares of the parsed outcomes, n (parsed) and unparseable."""
    parsed = [o for o in outcomes if o is not None]
    n = len(parsed)
    out = {o: parsed.count(o) / n if n else math.nan for o in OUTCOMES}
    out["win_tie"] = out["win"] + out["tie"]
    return {**out, "n": n, "unparseable": len(outcomes) - n}


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a t-interval over ``values`` (one per run); NaN bounds for one run."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def bootstrap_interval(data: tuple, statistic, confidence: float = 0.95, n_resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*data, axis=-1)`` over paired samples.

    data: arrays of equal length [n] (resampled together, e.g. log-probs and token counts).
    """
    from scipy import stats

    arrays = tuple(np.asarray(a, dtype=float) for a in data)
    if len(arrays[0]) == 0:
        return math.nan, math.nan
    if all(np.all(a == a[0]) for a in arrays):  # nothing varies: the interval is the value
        v = float(statistic(*arrays, axis=-1))
        return v, v
    res = stats.bootstrap(arrays, statistic, paired=True, vectorized=True, confidence_level=confidence,
                          n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def rate_intervals(outcomes: list, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict:
    """{rate: [low, high]}: bootstrap over prompts of each rate (unparseable left out)."""
    parsed = [o for o in outcomes if o is not None]
    out = {}
    for rate in RATES:
        hit = [(o in ("win", "tie")) if rate == "win_tie" else (o == rate) for o in parsed]
        out[rate] = list(bootstrap_interval((hit,), _mean, confidence, n_resamples, seed))
    return out


def _ppl(nll, tokens, axis=-1):
    return np.exp(np.sum(nll, axis=axis) / np.sum(tokens, axis=axis))


def perplexity_interval(logps: list[float], tokens: list[int], confidence: float = 0.95,
                        n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap over examples of exp(Σ NLL / Σ tokens) (examples resampled whole)."""
    return bootstrap_interval(([-v for v in logps], tokens), _ppl, confidence, n_resamples, seed)


def summarize(judgments: list, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Per criterion: rates, bootstrap intervals, and how often the two orders disagreed."""
    out = {}
    for crit in sorted({c for j in judgments for c in j.verdicts}):
        outcomes = [j.verdicts.get(crit) for j in judgments]
        r = rates(outcomes)
        r["ci"] = rate_intervals(outcomes, confidence, n_resamples, seed)
        r["order_disagreements"] = sum(bool(j.disagreement.get(crit)) for j in judgments)
        out[crit] = r
    return out
