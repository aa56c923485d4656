"""Typed configuration of the judges (``ulma eval judge`` / ``ulma eval agreement``).

Loaded from YAML plus ``key=value`` overrides with the strictness of :mod:`ulma.config`:
an unknown key or a value of the wrong type stops at start, naming the dotted key.
Every key is documented in ``configs/eval/judge.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ulma.config import ConfigError, from_dict, load_raw

CRITERIA = ("helpful", "harmless")  # the two criteria of the paper's Appendix B prompt


@dataclass
class ApiJudgeConfig:
    base_url: Optional[str] = None  # None = $OPENAI_BASE_URL, else the OpenAI API
    model: Optional[str] = None  # None = $ULMA_JUDGE_MODEL (the paper used GPT-4)
    api_key: Optional[str] = None  # prefer api_key_env: a key in a YAML file ends up in results and logs
    api_key_env: str = "OPENAI_API_KEY"  # environment variable read when api_key is null
    concurrency: int = 4  # requests in flight at once
    max_retries: int = 6  # retries per request on connection errors, timeouts, 408/409/429/5xx (with backoff)
    timeout: float = 60.0  # seconds per request
    temperature: float = 0.0  # 0 = the judge's most likely verdict
    max_tokens: int = 64  # the verdicts are a few tokens


@dataclass
class LocalJudgeConfig:
    model: str = "smollm2-135m-instruct"  # a Hugging Face chat model (hub id, folder or run/adapter folder)
    batch_size: int = 4
    max_new_tokens: int = 32
    max_prompt_length: int = 2048  # judge prompts longer than this are cut from the left
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class RewardJudgeConfig:
    model: Optional[str] = None  # a folder: sequence-classification model with one output + its tokenizer
    criterion: Literal["helpful", "harmless"] = "harmless"  # what the reward measures
    tie_margin: float = 0.0  # |r(model) - r(reference)| <= margin is a tie
    batch_size: int = 8
    max_length: int = 1024  # prompt + response tokens; the prompt is cut from the left
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: bf16 autocast, float32 weights


@dataclass
class JudgeConfig:
    kind: Literal["api", "local", "reward"] = "api"
    both_orders: bool = True  # ask (model, reference) and (reference, model); disagreement = tie
    cache: Optional[str] = None  # SQLite file of verdicts; None = judge_cache.sqlite in the output folder
    api: ApiJudgeConfig = field(default_factory=ApiJudgeConfig)
    local: LocalJudgeConfig = field(default_factory=LocalJudgeConfig)
    reward: RewardJudgeConfig = field(default_factory=RewardJudgeConfig)


@dataclass
class StatsConfig:
    confidence: float = 0.95  # the paper's 95% intervals
    bootstrap_samples: int = 2000  # resamples of prompts when there is one run
    seed: int = 0


@dataclass
class EvalConfig:
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)


def load_eval_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> EvalConfig:
    """Read ``path`` (YAML) and apply ``key=value`` overrides, then check cross-field rules."""
    cfg = from_dict(EvalConfig, load_raw(path, overrides))
    validate_eval(cfg)
    return cfg


def validate_eval(cfg: EvalConfig) -> None:
    j, s = cfg.judge, cfg.stats
    checks = [
        (j.api.concurrency >= 1, "judge.api.concurrency", "must be >= 1"),
        (j.api.max_retries >= 0, "judge.api.max_retries", "must be >= 0"),
        (j.api.timeout > 0, "judge.api.timeout", "must be > 0"),
        (j.api.max_tokens >= 1, "judge.api.max_tokens", "must be >= 1"),
        (j.local.batch_size >= 1, "judge.local.batch_size", "must be >= 1"),
        (j.reward.batch_size >= 1, "judge.reward.batch_size", "must be >= 1"),
        (j.reward.tie_margin >= 0, "judge.reward.tie_margin", "must be >= 0"),
        (0 < s.confidence < 1, "stats.confidence", "must be in (0, 1)"),
        (s.bootstrap_samples >= 100, "stats.bootstrap_samples", "must be >= 100"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")
    if j.kind == "reward" and not j.reward.model:
        raise ConfigError("judge.reward.model: a reward judge needs a sequence-classification checkpoint")
