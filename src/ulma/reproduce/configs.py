"""The configs a reproduction trains with (built from the scale, one per job), and running
one training: in this process, or through ``accelerate launch`` on every GPU."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ulma import checkpoint as ckpt
from ulma.atomic import atomic_write_text
from ulma.config import Config, SourceConfig, to_dict
from ulma.methods import METHODS
from ulma.reproduce.context import Context
from ulma.reproduce.scales import Scale, grad_accum, processes
from ulma.reproduce.splits import source_options


def fingerprint(cfg: Config) -> dict:
    """A config as saved in config.yaml: everything that changes the result (not progress bars
    or how the run was started)."""
    d = to_dict(cfg)
    for key in ("progress", "resume", "overwrite"):
        d["train"].pop(key)
    return d


def split_source(ctx: Context, ds, part: str) -> SourceConfig:
    return SourceConfig(source="jsonl", path=str(ctx.data_dir(ds) / f"{part}.jsonl"),
                        options=source_options(ds.kind, part))


def base_config(ctx: Context, ds, seed: int, out: Path) -> Config:
    """The scale's training settings for one run on ``ds`` (method and data set by the caller)."""
    p = ctx.scale.policy
    cfg = Config()
    cfg.model.name_or_path, cfg.model.lora = p.model, copy.deepcopy(p.lora)
    cfg.data.max_length, cfg.data.eval_limit = ctx.max_length(ds), p.eval_limit
    cfg.method.beta, cfg.method.logp_reduction = p.beta, p.logp_reduction
    cfg.method.target_offset, cfg.method.target_scale = p.target_offset, p.target_scale
    t = cfg.train
    t.output_dir, t.seed, t.epochs, t.max_steps = str(out), seed, p.epochs, p.max_steps
    t.micro_batch_size, t.grad_accum, t.lr, t.warmup_ratio = p.micro_batch_size, grad_accum(ctx.scale), p.lr, p.warmup_ratio
    t.bf16, t.save_every, t.progress = p.bf16, p.save_every, ctx.progress
    return cfg


def policy_config(ctx: Context, ds, method: str, seed: int) -> Config:
    """A cell's config: the method on the training split, held-out numbers on the test split.
    DPO on point-wise data reads the pairs files (two responses to one prompt, different labels)."""
    cfg = base_config(ctx, ds, seed, ctx.cell_dir(ds, method, seed))
    cfg.method.name = method
    pairs = needs_pairs(method, ds)
    cfg.data.train = split_source(ctx, ds, "train_pairs" if pairs else "train")
    cfg.data.eval = split_source(ctx, ds, "test_pairs" if pairs else "test")
    return cfg


def needs_pairs(method: str, ds) -> bool:
    return method in METHODS and METHODS[method].kind == "pair" and ds.kind != "pair"


def reward_config(ctx: Context, ds, seed: int, out: Path, part: str, *, judge: bool) -> Config:
    """A reward model on ``part``: the judge or RLHF's.  RLHF's uses ``reward.loss: auto``
    (Eq. 2 on pairs, Eq. 7 on binary labels, Eq. 9 on scores, as the paper's RLHF); the
    judge, which compares two answers, is Bradley-Terry on pairs (of point-wise data too:
    two answers to one prompt with different labels), except on scores, where MSE uses
    every scored answer (red-team has one answer per prompt: no pairs)."""
    s = ctx.scale
    cfg = base_config(ctx, ds, seed, out)
    cfg.method.name = "reward"
    cfg.reward.loss = "auto" if not judge else "mse" if ds.kind == "continuous" else "bradley_terry"
    cfg.data.train, cfg.data.eval = split_source(ctx, ds, part), split_source(ctx, ds, "test")
    t = cfg.train
    if judge:
        cfg.model.name_or_path = s.judge.model or s.policy.model
        cfg.data.max_length, cfg.data.eval_limit = s.judge.max_length, s.judge.eval_limit
        t.lr, t.epochs, t.micro_batch_size = s.judge.lr, s.judge.epochs, s.judge.micro_batch_size
    else:
        t.lr, t.epochs = s.rlhf.reward_lr, s.rlhf.reward_epochs
    t.max_steps, t.grad_accum = None, max(1, s.policy.batch_size // t.micro_batch_size)  # one process
    return cfg


def ppo_config(ctx: Context, ds, seed: int) -> Config:
    """RLHF's PPO stage against the reward model of (ds, seed)."""
    r = ctx.scale.rlhf
    cfg = base_config(ctx, ds, seed, ctx.cell_dir(ds, "rlhf", seed))
    cfg.method.name = "rlhf"
    cfg.data.train, cfg.data.eval = split_source(ctx, ds, "train"), split_source(ctx, ds, "test")
    p = cfg.ppo
    p.reward_model, p.reward_max_length = str(ctx.reward_dir(ds, seed) / "final"), ctx.max_length(ds)
    p.rollout_batch, p.mini_batch_size, p.ppo_epochs = r.rollout_batch, r.mini_batch_size, r.ppo_epochs
    p.max_new_tokens, p.eval_prompts = r.max_new_tokens, r.eval_prompts
    cfg.train.lr, cfg.train.max_steps, cfg.train.epochs, cfg.train.grad_accum = r.lr, r.max_steps, r.epochs, 1
    return cfg


# ------------------------------------------------------------------ running one training


def train_in(ctx: Context, cfg: Config, folder: Path, launch=None) -> float:
    """Train ``cfg`` into ``folder`` unless it holds a finished run of the same config.

    An unfinished run of the same config resumes from its newest checkpoint; anything else
    in the folder is deleted first.  ``launch(cfg, config_path)`` runs the training (default:
    in this process).  Returns the seconds spent.
    """
    saved = folder / "config.yaml"
    same = saved.exists() and saved_settings(ctx, saved) == ctx.relative(fingerprint(cfg))
    if same and (folder / "results.json").exists():
        return 0.0
    resume = same and ckpt.latest_checkpoint(folder) is not None
    if folder.exists() and not resume:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.train.resume = resume
    atomic_write_text(saved, yaml.safe_dump(fingerprint(cfg), sort_keys=False))
    t0 = time.perf_counter()
    (launch or _train_here)(cfg, saved)
    return time.perf_counter() - t0


def saved_settings(ctx: Context, path: Path) -> dict:
    """A run's config.yaml with its paths relative to the OUT it was written in (found from its
    output_dir, which is OUT/<the run's folder>): OUT may have moved since."""
    old = yaml.safe_load(path.read_text()) or {}
    out_dir, rel = str(old.get("train", {}).get("output_dir", "")), str(path.parent.relative_to(ctx.out))
    root = out_dir[: -len(rel) - 1] if out_dir.endswith("/" + rel) else None
    return ctx.relative(old, root)


def _train_here(cfg: Config, config_path: Path) -> None:
    from ulma.trainer import train

    train(cfg)


def accelerate_command(scale: Scale, config_path: Path, resume: bool = False) -> list[str]:
    """``accelerate launch ... -m ulma train CONFIG``: a policy cell on every GPU."""
    n = processes(scale)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n)]
    if scale.accelerate_config:
        cmd += ["--config_file", scale.accelerate_config]
    elif n > 1:
        cmd += ["--multi_gpu"]
    return cmd + ["-m", "ulma", "train", str(config_path)] + (["train.resume=true"] if resume else [])


def accelerate_launcher(scale: Scale):
    """A ``launch(cfg, config_path)`` for :func:`train_in` that trains through ``accelerate launch``."""

    def launch(cfg: Config, config_path: Path) -> None:
        subprocess.run(accelerate_command(scale, config_path, cfg.train.resume), check=True)

    return launch


def show_command(cmd: list[str]) -> str:
    """The command as a person would type it."""
    text = " ".join(cmd)
    return text.replace(f"{sys.executable} -m accelerate.commands.launch", "accelerate launch")
