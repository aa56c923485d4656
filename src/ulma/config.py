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

from ulma.errors import ConfigError  # in errors.py: modules that config.py checks with raise it too


@dataclass
class LoraConfig:
    enabled: bool = True  # False = full fine-tuning
    r: int = 8  # paper: r=8
    alpha: int = 32  # paper: alpha=32
    dropout: float = 0.1  # paper: dropout=0.1
    # module names that get adapters, or a string peft reads: "all-linear" (every Linear but the
    # output layer) or a regular expression matched against the full module names
    target_modules: Union[str, list[str]] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"  # hub id, local folder, or the offline default alias
    lora: LoraConfig = field(default_factory=LoraConfig)
    reference: Literal["precompute", "live"] = "precompute"  # precompute: ref log-probs once, no ref model kept
    trust_remote_code: bool = False
    load_in_4bit: bool = False  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only); needs LoRA


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
    logp_reduction: Literal["sum", "mean", "auto"] = "sum"  # log pi(y|x) over response tokens: their sum (paper),
    # their mean, or auto = the authors' code per method (sum for dpo, kto, bco; mean for the point-wise losses)
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
    max_grad_norm: Optional[float] = 1.0  # clip the global gradient norm to this; 0 or null: no clipping (norm logged)
    max_bad_steps: int = 3  # non-finite loss/gradients: skip the step; stop after this many in a row
    bf16: Union[bool, Literal["auto"]] = "auto"  # bf16 autocast, fp32 master weights; auto = where it is fast
    eval_every: int = 0  # optimizer steps between evaluations; 0 = only before and after training
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    overwrite: bool = False  # replace an earlier run in output_dir (otherwise that is an error)
    group_by_length: bool = True  # batches of similar length: less padding; the heaviest one first
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, one more forward per step
    lean_activations: bool = True  # keep less for the backward, the same values (ulma.activations): SiLU-gated MLPs
    # (Llama, Mistral, Qwen...) recompute silu(gate), one [tokens, MLP width] tensor less a layer; dropout keeps a
    # bool mask on a CPU (as CUDA's does), not a float one
    recompute_lora: Union[bool, Literal["auto"]] = "auto"  # LoRA adapters rerun dropout and their rank-r products
    # in the backward, keeping one input for q/k/v instead of a mask and a copy each (ulma.activations); auto = on
    # a GPU, or with lora.dropout 0 (on a CPU, rebuilding the dropped input from the mask slows a step: docs/speed.md)
    fused_logps: bool = True  # output layer only at scored positions, chunked: no [N, T, V] logits (logprobs.py)
    share_prompts: bool = True  # rows with one prompt (a pair's two responses) packed, the prompt run once (logprobs.py)
    pad_to_multiple_of: int = 64  # batch widths and scored-token counts rounded up to this (1: none): a few shapes
    # instead of one per step, so a CPU run's kernel caches and heap stop growing; costs the padding's compute
    bf16_frozen_weights: bool = True  # under bf16 autocast, frozen Linear weights (LoRA's base, a reference copy, PPO's reward model) kept in bf16
    fused_optimizer: bool = True  # torch's fused AdamW (one kernel for all parameters); not under FSDP/DeepSpeed
    optimizer_in_backward: bool = False  # AdamW applied to each parameter as its gradient completes, which is then
    # freed (ulma.backward_step): no model-sized set of gradients at once. Needs grad_accum: 1, max_grad_norm: 0
    # (no global norm before the updates) and one process
    forward_batch_size: Optional[int] = None  # rows per forward-only batch (reference log-probs, evaluation);
    # None: 4 x micro_batch_size on CUDA (more rows fit: no activations are kept; small batches leave a GPU
    # idle), micro_batch_size elsewhere (benchmarks/README.md)
    compile: bool = False  # torch.compile each decoder layer (models.compile_layers): fewer kernel launches; fewer saved activations
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager": no code generation, for debugging)
    compile_mode: Optional[str] = None  # torch.compile's mode: null (default), "reduce-overhead" (CUDA graphs), "max-autotune"
    progress: bool = True
    log_every: int = 1  # steps a metrics row covers (their means; a row at every checkpoint and the last step too)
    report_to: list[str] = field(default_factory=list)  # experiment trackers beside metrics.jsonl, through
    # accelerate: tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio (ulma.tracking)
    push_to_hub: Optional[str] = None  # a hub repo id: final/ and a model card uploaded there at the end (ulma.export)
    hub_private: bool = False  # create that repo private

    def forward_rows(self, device_type: str) -> int:
        """Rows per forward-only batch on a device of ``device_type`` ("cuda", "cpu", ...):
        ``forward_batch_size``, else 4 x ``micro_batch_size`` on CUDA and ``micro_batch_size``
        elsewhere (see the field's comment)."""
        return self.forward_batch_size or self.micro_batch_size * (4 if device_type == "cuda" else 1)


@dataclass
class RewardConfig:
    """``method: reward`` -- a scalar reward model r_phi(x, y) (§3.2)."""

    loss: Literal["auto", "bradley_terry", "bce", "mse"] = "auto"  # auto: pairs -> bradley_terry (Eq. 2),
    # binary labels -> bce (Eq. 7), scores -> mse (Eq. 9, target method.target_scale * (z - method.target_offset));
    # bradley_terry on point-wise data trains on the pairs of same-prompt responses with different labels
    head: Literal["seq_cls"] = "seq_cls"  # AutoModelForSequenceClassification, num_labels=1, score at the last token
    calibration_bins: int = 10  # equal-width bins of sigma(r) for the expected calibration error (binary labels)


@dataclass
class PPOConfig:
    """``method: rlhf`` -- PPO on the KL-regularised objective (Eq. 3) with a value head and LoRA."""

    reward_model: Optional[str] = None  # folder saved by `method: reward` (AutoModelForSequenceClassification)
    reward_max_length: int = 512  # the reward model's token limit; it re-tokenises the text, prompt cut from the left
    rollout_batch: int = 16  # prompts sampled and scored per PPO step
    mini_batch_size: int = 8  # rollouts per optimizer update (split into train.micro_batch_size forwards)
    ppo_epochs: int = 4  # passes over each rollout batch
    max_new_tokens: int = 64  # response length limit; prompts are cut from the left to data.max_length - this
    temperature: float = 1.0  # sampling temperature (log-probs are taken under the same temperature)
    top_p: float = 1.0  # nucleus sampling; 1.0 = sample from the whole distribution
    beta: Optional[float] = None  # per-token KL penalty to the reference; None = method.beta
    kl_estimator: Literal["k1", "k3"] = "k1"  # k1 = log pi - log ref; k3 = exp(-k1) - 1 + k1 (>= 0)
    gamma: float = 1.0  # discount in GAE
    lam: float = 0.95  # GAE lambda
    clip_range: float = 0.2  # policy ratio clipped to [1 - clip_range, 1 + clip_range]
    value_clip: float = 0.2  # a value may move this far from the rollout's value before the loss clips it
    vf_coef: float = 0.1  # weight of the value loss next to the policy loss
    whiten_advantages: bool = True  # advantages normalised to mean 0, std 1 over the batch's tokens
    eval_prompts: int = 32  # held-out prompts sampled and scored before/after training (and at eval_every); 0 = none


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)  # used by method.name: reward
    ppo: PPOConfig = field(default_factory=PPOConfig)  # used by method.name: rlhf


# ------------------------------------------------------------------------- loading


def load_raw(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Read ``path`` (YAML) and apply ``key=value`` overrides (values parsed as YAML): the
    untyped mapping that :func:`from_dict` turns into a config."""
    raw: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key, value in parse_assignments(overrides, "override", "section.key=value"):
        _set_dotted(raw, key, value)
    return raw


def parse_assignments(items, what: str = "option", form: str = "key=value") -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[x, y]"]`` -> ``[("a.b", 1), ("c", ["x", "y"])]``, values read as YAML:
    the one parser of the command lines' ``key=value`` arguments (overrides, --option, --set)."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {item!r} must look like {form}")
        try:
            out.append((key.strip(), yaml.safe_load(value)))
        except yaml.YAMLError as e:
            raise ConfigError(f"{what} {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return out


CONFIGS = Path(__file__).parent / "configs"  # the example configs shipped with the package


def packaged_configs() -> list[str]:
    """Names of the shipped example configs (``ulma configs`` lists them)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file as given, or else a shipped config by name (``ulma_hh`` or ``ulma_hh.yaml``)."""
    given = Path(path)
    if given.exists():
        return given
    shipped = CONFIGS / (given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml")
    if given.parent in (Path("."), Path("configs")) and shipped.exists():
        return shipped
    raise ConfigError(f"config {str(path)!r}: no such file, and no shipped config of that name "
                      f"(shipped: {', '.join(packaged_configs())}; `ulma configs NAME` copies one out)")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Read ``path`` (YAML) and apply ``key=value`` overrides (values parsed as YAML)."""
    return from_dict(Config, load_raw(path, overrides))


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
    _refuse_unused(cfg)  # first: a key the method's loop ignores is the error, not its other conditions
    t = cfg.train
    checks = [
        (t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1"),
        (t.forward_batch_size is None or t.forward_batch_size >= 1, "train.forward_batch_size", "must be >= 1 or null"),
        (t.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
        (t.log_every >= 1, "train.log_every", "must be >= 1"),
        (t.pad_to_multiple_of >= 1, "train.pad_to_multiple_of", "must be >= 1 (1: no rounding)"),
        (t.lr > 0, "train.lr", "must be > 0"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)"),
        (t.epochs > 0 or t.max_steps, "train.epochs", "must be > 0 (or set train.max_steps)"),
        (cfg.method.beta > 0, "method.beta", "must be > 0"),
        (0 < cfg.data.eval_fraction < 1, "data.eval_fraction", "must be in (0, 1)"),
        (cfg.data.max_length >= 8, "data.max_length", "must be >= 8"),
        (cfg.model.lora.r >= 1, "model.lora.r", "must be >= 1"),
        (not t.max_grad_norm or t.max_grad_norm > 0, "train.max_grad_norm", "must be > 0, or 0 / null for no clipping"),
        (not t.optimizer_in_backward or t.grad_accum == 1, "train.optimizer_in_backward",
         "needs train.grad_accum: 1 (each gradient is applied and freed as soon as one backward completes it)"),
        (not t.optimizer_in_backward or not t.max_grad_norm, "train.optimizer_in_backward",
         "needs train.max_grad_norm: 0 (clipping to the global norm needs every gradient before any update)"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")
    from ulma.methods import LOOPS, METHODS

    if cfg.method.name not in METHODS and cfg.method.name not in LOOPS:
        raise ConfigError(
            f"method.name: unknown method {cfg.method.name!r}; choose one of {sorted(METHODS) + sorted(LOOPS)}"
        )
    _validate_rlhf(cfg)
    _validate_integrations(cfg)


def _validate_integrations(cfg: Config) -> None:
    """Keys that need a package, a GPU or a hub token: checked before any work."""
    from ulma.tracking import check_trackers

    check_trackers(cfg.train.report_to)
    if cfg.model.load_in_4bit:
        from ulma.models import check_4bit

        check_4bit(cfg.model, cfg.method.name)
    if cfg.train.push_to_hub:
        from ulma.export import check_push

        check_push(cfg.train.push_to_hub)


# train.* keys the reward and PPO loops do not use: a value
# other than the default is an error rather than a setting that silently does nothing.
_NEITHER = ("compile", "compile_backend", "compile_mode", "forward_batch_size", "share_prompts", "fused_logps",
            "optimizer_in_backward")
UNUSED_TRAIN_KEYS = {"reward": _NEITHER,
                     "rlhf": _NEITHER + ("gradient_checkpointing", "group_by_length", "pad_to_multiple_of")}


def _refuse_unused(cfg: Config) -> None:
    default = TrainConfig()
    for key in UNUSED_TRAIN_KEYS.get(cfg.method.name, ()):
        if getattr(cfg.train, key) != getattr(default, key):
            raise ConfigError(f"train.{key}: not used by method {cfg.method.name!r} (its own loop); "
                              f"leave it at its default ({getattr(default, key)!r})")


def _validate_rlhf(cfg: Config) -> None:
    """Checks of the reward and ppo sections (their defaults pass)."""
    p = cfg.ppo
    checks = [
        (cfg.reward.calibration_bins >= 1, "reward.calibration_bins", "must be >= 1"),
        (p.rollout_batch >= 1, "ppo.rollout_batch", "must be >= 1"),
        (1 <= p.mini_batch_size <= p.rollout_batch, "ppo.mini_batch_size", "must be in [1, ppo.rollout_batch]"),
        (p.ppo_epochs >= 1, "ppo.ppo_epochs", "must be >= 1"),
        (p.max_new_tokens >= 1, "ppo.max_new_tokens", "must be >= 1"),
        (cfg.data.max_length - p.max_new_tokens >= 8 or cfg.method.name != "rlhf", "ppo.max_new_tokens",
         f"leaves fewer than 8 prompt tokens of data.max_length={cfg.data.max_length}"),
        (p.reward_max_length >= 8, "ppo.reward_max_length", "must be >= 8"),
        (p.temperature > 0, "ppo.temperature", "must be > 0"),
        (0 < p.top_p <= 1, "ppo.top_p", "must be in (0, 1]"),
        (p.beta is None or p.beta >= 0, "ppo.beta", "must be >= 0"),
        (0 <= p.gamma <= 1, "ppo.gamma", "must be in [0, 1]"),
        (0 <= p.lam <= 1, "ppo.lam", "must be in [0, 1]"),
        (p.clip_range > 0, "ppo.clip_range", "must be > 0"),
        (p.value_clip > 0, "ppo.value_clip", "must be > 0"),
        (p.vf_coef >= 0, "ppo.vf_coef", "must be >= 0"),
        (p.eval_prompts >= 0, "ppo.eval_prompts", "must be >= 0"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")
