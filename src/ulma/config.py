"""Typed configuration: dataclasses, loaded from YAML plus ``key=value`` overrides.

A wrong key or a value of the wrong type fails at start with an error that names the
dotted key (``train.lr``), never silently later.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the dotted key."""


@dataclass
class LoraConfig:
    enabled: bool = True  # False = full fine-tuning
    r: int = 8  # paper: r=8
    alpha: int = 32  # paper: alpha=32
    dropout: float = 0.1  # paper: dropout=0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"  # hub id, local folder, or the offline default alias
    lora: LoraConfig = field(default_factory=LoraConfig)
    reference: Literal["precompute", "live"] = "precompute"  # precompute: ref log-probs once, no ref model kept
    trust_remote_code: bool = False


@dataclass
class SourceConfig:
    source: str = "pyrit"  # a name from ulma.data.sources.SOURCES
    path: Optional[str] = None  # file or folder; None = the source's default (installed package or hub)
    options: dict = field(default_factory=dict)  # source-specific options (columns, kind, data_dir, ...)
    limit: Optional[int] = None  # keep the first N examples (after the split); None = all


@dataclass
class DataConfig:
    train: SourceConfig = field(default_factory=SourceConfig)
    eval: Optional[SourceConfig] = None  # None = hold out eval_fraction of train, split by prompt
    eval_fraction: float = 0.2
    eval_limit: Optional[int] = None  # cap on held-out examples used for evaluation
    max_length: int = 256  # prompt + response tokens; the prompt is cut from the left
    on_error: Literal["raise", "skip"] = "raise"  # bad rows: stop, or skip and count them


@dataclass
class MethodConfig:
    name: str = "ulma"  # a name from ulma.methods.METHODS
    beta: float = 0.1  # KL strength, paper: 0.1 for every method
    log_z: float = 0.0  # the constant log Z(x) in r = beta*(log pi - log ref) + beta*log Z (paper App. A: Z≈1)
    logp_reduction: Literal["sum", "mean"] = "sum"  # per-sample log-prob over response tokens
    balance: bool = True  # average positives and negatives separately, then add (authors' code)
    pos_weight: float = 1.0  # weight of the positive-sample term
    neg_weight: float = 1.0  # weight of the negative-sample term
    continuous_form: Literal["paper", "authors"] = "paper"  # continuous ULMA: MSE on all, or on non-best only
    positive_threshold: Optional[float] = None  # label >= this is positive; None = 1 / best-rated score
    target_offset: float = 0.5  # continuous losses regress r on target_scale * (z - target_offset);
    target_scale: float = 2.0  # (0.5, 2) maps scores in [0,1] to [-1,1]; (0, 1) is the paper's literal Eq. 9


@dataclass
class TrainConfig:
    output_dir: str = "runs/ulma"
    seed: int = 0
    epochs: float = 1.0  # paper: 1 epoch
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 8
    grad_accum: int = 8  # batch = micro_batch_size * grad_accum * processes (paper: 64)
    lr: float = 1e-5  # paper: 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    bf16: Union[bool, Literal["auto"]] = "auto"  # bf16 autocast, fp32 master weights; auto = where it is fast
    eval_every: int = 0  # optimizer steps between evaluations; 0 = only before and after training
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    overwrite: bool = False  # replace an earlier run in output_dir (otherwise that is an error)
    group_by_length: bool = True  # batches of similar length: less padding
    progress: bool = True
    log_every: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read ``path`` (YAML) and apply ``key=value`` overrides (values parsed as YAML)."""
    raw: dict = {}
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return from_dict(Config, raw)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    d[parts[-1]] = value


def from_dict(cls, data: Any, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, checking every key and value type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]!r}; valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp, value, key):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of: " + "; ".join(errors))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return _scalar(tp, value, key)


def _scalar(tp, value, key):
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def validate(cfg: Config) -> None:
    """Cross-field checks that a type cannot express."""
    t = cfg.train
    checks = [
        (t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
        (t.lr > 0, "train.lr", "must be > 0"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)"),
        (t.epochs > 0 or t.max_steps, "train.epochs", "must be > 0 (or set train.max_steps)"),
        (cfg.method.beta > 0, "method.beta", "must be > 0"),
        (0 < cfg.data.eval_fraction < 1, "data.eval_fraction", "must be in (0, 1)"),
        (cfg.data.max_length >= 8, "data.max_length", "must be >= 8"),
        (cfg.model.lora.r >= 1, "model.lora.r", "must be >= 1"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")
    from ulma.methods import METHODS

    if cfg.method.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {cfg.method.name!r}; choose one of {sorted(METHODS)}")
