"""The scales of ``ulma reproduce``: ``paper`` (the paper's setup), ``cpu`` (the same
experiments shrunk to fit a 2-core CPU) and ``medium`` (one seed, enough data to separate methods on a CPU).  Either runs the paper's setup as its text states it
(``policy.setup: paper``) or as the authors' code runs it (``--set policy.setup=authors``:
:data:`AUTHORS_SETUP`).

A scale is a typed config (:class:`Scale`); ``--set section.key=value`` changes one value
with the checks of :mod:`ulma.config` (an unknown key or a wrong type names the dotted key).
:func:`scaled_down` lists every value where cpu differs from paper: what the reports and
the README say is scaled down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ulma.config import ConfigError, LoraConfig, _set_dotted, from_dict, parse_assignments

PAPER_MODEL = "lmsys/vicuna-7b-v1.5"


@dataclass
class PolicyScale:
    """Training of every cell (the method's loss comes from ulma.methods)."""

    model: str = PAPER_MODEL  # policy and reference (LoRA: the base with adapters off)
    lora: LoraConfig = field(default_factory=LoraConfig)  # paper: r=8, alpha=32, dropout=0.1
    beta: float = 0.1  # paper: 0.1 in every method
    lr: float = 1e-5  # paper: 1e-5, cosine decay
    warmup_ratio: float = 0.0  # paper: "initial learning rate 1e-5, followed by a cosine decay"
    micro_batch_size: int = 8  # units per forward pass per process (a pair is one unit)
    batch_size: int = 64  # units per optimizer step = micro_batch_size x grad_accum x processes (paper: 64)
    epochs: float = 1.0  # paper: 1 epoch
    max_steps: Optional[int] = None  # caps the optimizer steps of every cell; None = epochs decide
    max_length: int = 1024  # prompt + response tokens (prompt cut from the left); a data set may set its own
    setup: Literal["paper", "authors"] = "paper"  # authors: the choices of the authors' code (AUTHORS_SETUP)
    logp_reduction: Literal["sum", "mean", "auto"] = "sum"  # log pi(y|x) summed over response tokens (paper);
    # auto = per method as the authors' code (sum for dpo, mean for the point-wise losses)
    target_offset: float = 0.5  # Eq. 9 regresses r on target_scale * (z - target_offset): (0.5, 2) maps
    target_scale: float = 2.0  # scores in [0, 1] to [-1, 1]; (0, 1) is the raw score (paper's text, authors' code)
    bf16: Union[bool, Literal["auto"]] = "auto"  # bf16 autocast where it is fast (GPUs); fp32 on AVX2 CPUs
    eval_limit: Optional[int] = 256  # held-out examples the trainer scores before and after training
    save_every: int = 200  # optimizer steps between checkpoints (an interrupted cell resumes); 0 = none


@dataclass
class SplitScale:
    """How each data set is divided, by prompt, into train / test / judge (once, then reused)."""

    seed: int = 0
    test_fraction: float = 0.1  # share of prompts for testing (of the test source when there is one)
    judge_fraction: float = 0.1  # share of prompts for training the reward-model judge
    train_prompts: Optional[int] = None  # caps (a seeded sample of prompts); None = all
    test_prompts: Optional[int] = None
    judge_prompts: Optional[int] = None


@dataclass
class EvalScale:
    perplexity_limit: Optional[int] = None  # test positives scored; None = all
    generate_limit: Optional[int] = 500  # test prompts answered and judged (one reference answer each)
    max_new_tokens: int = 256  # greedy decoding
    max_prompt_length: int = 768  # longer prompts are cut from the left
    batch_size: int = 16


@dataclass
class JudgeScale:
    """The reward-model judge (used when no API judge is configured)."""

    model: Optional[str] = None  # its base model; None = policy.model
    lr: float = 5e-5
    epochs: float = 1.0
    micro_batch_size: int = 8  # pairs per forward pass
    max_length: int = 1024
    tie_margin: float = 0.0  # |r(model) - r(reference)| <= margin is a tie
    eval_limit: Optional[int] = 256  # held-out examples its trainer scores (its own before/after numbers)
    agreement_limit: Optional[int] = None  # test human pairs its agreement is measured on; None = all


@dataclass
class RlhfScale:
    """RLHF: a reward model on the policy's training split (per data set and seed), then PPO."""

    reward_lr: float = 5e-5
    reward_epochs: float = 1.0
    lr: float = 1e-5  # PPO's AdamW on LoRA and the value head
    max_steps: Optional[int] = None  # PPO steps; None = epochs over the training prompts
    epochs: float = 1.0
    rollout_batch: int = 64  # prompts per PPO step (the paper's batch 64)
    mini_batch_size: int = 16
    ppo_epochs: int = 4
    max_new_tokens: int = 128
    eval_prompts: int = 0  # PPO's own held-out reward before/after; the cell's evaluation is separate


@dataclass
class Scale:
    name: str = "paper"
    seeds: int = 3  # training runs per cell (paper: 3, 95% intervals)
    policy: PolicyScale = field(default_factory=PolicyScale)
    split: SplitScale = field(default_factory=SplitScale)
    eval: EvalScale = field(default_factory=EvalScale)
    judge: JudgeScale = field(default_factory=JudgeScale)
    rlhf: RlhfScale = field(default_factory=RlhfScale)
    launcher: Literal["inprocess", "accelerate"] = "accelerate"  # how policy cells train (reward/PPO: in process)
    num_processes: Optional[int] = None  # accelerate processes; None = the GPUs visible (at least 1)
    accelerate_config: Optional[str] = None  # e.g. configs/accelerate/ddp.yaml


def paper_scale() -> Scale:
    """The paper's setup (§5.1): Vicuna-7B v1.5, LoRA r=8 alpha=32 dropout=0.1, beta=0.1,
    batch 64, lr 1e-5 with cosine decay, 1 epoch; PPO and judge settings are ours (the
    paper gives none)."""
    return Scale()


def cpu_scale() -> Scale:
    """Table 1's HH column (7 methods x 3 seeds) shrunk to fit a 2-core CPU (timings: docs/reproduce.md)."""
    return Scale(
        name="cpu",
        policy=PolicyScale(model="smollm2-135m-instruct", lr=3e-4, warmup_ratio=0.05, micro_batch_size=8,
                           batch_size=8, max_length=128, eval_limit=16, save_every=0),
        split=SplitScale(seed=0, test_fraction=0.2, judge_fraction=0.3, train_prompts=48, test_prompts=48,
                         judge_prompts=128),
        eval=EvalScale(perplexity_limit=None, generate_limit=48, max_new_tokens=48, max_prompt_length=128,
                       batch_size=8),
        judge=JudgeScale(lr=1e-3, epochs=1.0, micro_batch_size=8, max_length=128, eval_limit=16),
        rlhf=RlhfScale(reward_lr=1e-3, reward_epochs=1.0, lr=1e-4, max_steps=6, rollout_batch=8, mini_batch_size=8,
                       ppo_epochs=2, max_new_tokens=32),
        launcher="inprocess",
    )


def medium_scale() -> Scale:
    """One column of Table 1 (its 7 methods plus KTO and BCO, one seed) with enough prompts and
    steps to separate methods, sized for a 2-core CPU with bf16 products (AMX or
    AVX512-BF16): 480 training prompts (60 steps of 16 units for HH made point-wise), 160 test
    prompts, and a reward-model judge on the remaining prompts for 2 epochs."""
    cpu = cpu_scale()
    return dataclasses.replace(
        cpu, name="medium", seeds=1,
        policy=dataclasses.replace(cpu.policy, lr=1e-4, batch_size=16, max_length=192, eval_limit=64),
        split=SplitScale(seed=0, test_fraction=0.12, judge_fraction=0.6, train_prompts=480, test_prompts=160,
                         judge_prompts=None),
        eval=EvalScale(perplexity_limit=None, generate_limit=96, max_new_tokens=64, max_prompt_length=128,
                       batch_size=8),
        judge=JudgeScale(lr=5e-4, epochs=2.0, micro_batch_size=8, max_length=192, eval_limit=64),
        rlhf=RlhfScale(reward_lr=5e-4, reward_epochs=1.0, lr=1e-4, max_steps=20, rollout_batch=16, mini_batch_size=8,
                       ppo_epochs=2, max_new_tokens=48),
    )


SCALES = {"paper": paper_scale, "cpu": cpu_scale, "medium": medium_scale}
LOCAL_SCALES = ("cpu", "medium")  # scales that read the data at hand (local files, installed packages)

# policy.setup=authors: what the authors' public code does where it differs from the paper's
# text (docs: paper-notes): log pi(y|x) summed for pair-wise DPO and averaged over tokens for
# point-wise DPO / ULMA / Unlearning / Unlikelihood, no LoRA dropout (their trainers turn
# dropout off), and Eq. 9 on the raw score.
AUTHORS_SETUP = {"policy.logp_reduction": "auto", "policy.lora.dropout": 0.0, "policy.target_offset": 0.0,
                 "policy.target_scale": 1.0}


def load_scale(name: str, overrides: list[str] | tuple = ()) -> Scale:
    """The preset ``name`` with ``section.key=value`` overrides (values read as YAML)."""
    if name not in SCALES:
        raise ConfigError(f"unknown scale {name!r}; choose one of {sorted(SCALES)}")
    raw = dataclasses.asdict(SCALES[name]())
    given = dict(parse_assignments(overrides, "--set", "section.key=value"))
    for key, value in given.items():
        _set_dotted(raw, key, value)
    if (raw.get("policy") or {}).get("setup") == "authors":
        for key, value in AUTHORS_SETUP.items():
            if key in given and given[key] != value:
                raise ConfigError(f"{key}: policy.setup=authors sets it to {value!r} (the authors' code); "
                                  f"drop one of the two settings")
            _set_dotted(raw, key, value)
    scale = from_dict(Scale, raw)
    check_scale(scale)
    return scale


def check_scale(s: Scale) -> None:
    """Cross-field checks that a type cannot express."""
    p, sp = s.policy, s.split
    checks = [
        (s.seeds >= 1, "seeds", "must be >= 1"),
        (p.micro_batch_size >= 1, "policy.micro_batch_size", "must be >= 1"),
        (p.batch_size >= p.micro_batch_size, "policy.batch_size", "must be >= policy.micro_batch_size"),
        (0 < sp.test_fraction < 1 and 0 < sp.judge_fraction < 1, "split.test_fraction",
         "and split.judge_fraction must be in (0, 1)"),
        (sp.test_fraction + sp.judge_fraction < 1, "split.judge_fraction",
         "split.test_fraction + split.judge_fraction must leave prompts to train on (< 1)"),
        (s.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1"),
        (s.num_processes is None or s.num_processes >= 1, "num_processes", "must be >= 1"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")


def processes(scale: Scale) -> int:
    """Processes a policy cell trains on: 1 in process, else ``num_processes`` or the GPUs visible."""
    if scale.launcher == "inprocess":
        return 1
    if scale.num_processes:
        return scale.num_processes
    import torch

    return max(1, torch.cuda.device_count())


def grad_accum(scale: Scale) -> int:
    """Micro-batches per optimizer step so that micro x accum x processes = policy.batch_size."""
    p, n = scale.policy, processes(scale)
    per_step = p.micro_batch_size * n
    if p.batch_size % per_step:
        raise ConfigError(f"policy.batch_size: {p.batch_size} is not a multiple of micro_batch_size x processes "
                          f"= {p.micro_batch_size} x {n}")
    return p.batch_size // per_step


def scaled_down(scale: Scale, reference: Scale | None = None) -> list[tuple[str, object, object]]:
    """(dotted key, this scale's value, the paper's value) for every value that differs
    (how many processes a run is launched on is not a difference of the experiment)."""
    mine, paper = _flat(dataclasses.asdict(scale)), _flat(dataclasses.asdict(reference or paper_scale()))
    skip = ("name", "num_processes", "accelerate_config")
    return [(k, mine[k], paper[k]) for k in mine if k not in skip and mine[k] != paper.get(k)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out
