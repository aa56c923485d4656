"""The jobs of a reproduction, the configs they train with, and their completion markers.

Layout of ``OUT``::

    data/<ds>/                 the split (splits.py); manifest.json last
    judge/<ds>/<kind>/         the judge: a reward model trained on the judge split (kind
                               "reward"), and agreement/ with held-out human labels; DONE.json
    rlhf_reward/<ds>/seed<k>/  RLHF's reward model, trained on the policy's training split
    cells/<ds>/<method>/seed<k>/   one training run (config.yaml, metrics.jsonl, results.json,
                               final/) and its evaluation in eval/ (perplexity.json,
                               generations.jsonl, judge_summary.json); DONE.json

Each job writes ``DONE.json`` last (atomically), holding the settings it was made with.
A job whose marker exists is skipped; one made with other settings is an error (use
another ``--out``).  An unfinished job is redone cleanly: its training starts over (or
resumes from its newest checkpoint when it has one), its evaluation files, each written
whole, are kept, and generation resumes from its partial log.  A cell whose marker names
another judge keeps its model and generations and is judged again.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ulma import checkpoint as ckpt
from ulma.config import Config, SourceConfig, to_dict
from ulma.evaluation.io import read_json
from ulma.evaluation.report import default_criterion
from ulma.methods import METHODS
from ulma.reproduce.scales import Scale, grad_accum, processes
from ulma.reproduce.splits import check_same, prepare_split, read_part, source_options

MARKER = "DONE.json"


@dataclass
class JudgeChoice:
    """Which judge scores the cells: ``reward`` (a reward model trained here, the default),
    ``api`` (an OpenAI-compatible endpoint with the paper's Appendix B prompt) or ``local``."""

    kind: str = "reward"
    config: Optional[str] = None  # a judge YAML (configs/eval/judge.yaml) for api / local, and stats
    options: list = field(default_factory=list)  # key=value overrides of that YAML

    def eval_config(self):
        from ulma.config import from_dict, load_raw
        from ulma.evaluation.config import EvalConfig, load_eval_config

        if self.kind == "reward":  # the reward section is filled in per data set
            return from_dict(EvalConfig, load_raw(self.config, [*self.options, "judge.kind=reward"]))
        return load_eval_config(self.config, [*self.options, f"judge.kind={self.kind}"])


@dataclass
class Context:
    """What every job needs: where, at which scale, on which data, with which judge."""

    out: Path
    scale: Scale
    slots: dict  # slot -> DataSet (only the slots this run uses)
    judge: JudgeChoice = field(default_factory=JudgeChoice)
    progress: bool = True
    _judges: dict = field(default_factory=dict)
    _tests: dict = field(default_factory=dict)

    def data_dir(self, ds) -> Path:
        return self.out / "data" / ds.name

    def judge_dir(self, ds) -> Path:
        return self.out / "judge" / ds.name / self.judge.kind

    def reward_dir(self, ds, seed: int) -> Path:
        return self.out / "rlhf_reward" / ds.name / f"seed{seed}"

    def cell_dir(self, ds, method: str, seed: int) -> Path:
        return self.out / "cells" / ds.name / method / f"seed{seed}"

    def max_length(self, ds) -> int:
        return ds.max_length or self.scale.policy.max_length

    def stats(self):
        return self.judge.eval_config().stats

    def test_data(self, ds):
        """The test split as evaluation data (cached: every cell of a data set reads it)."""
        from ulma.evaluation.testdata import EvalData

        if ds.name not in self._tests:
            path = self.data_dir(ds) / "test.jsonl"
            about = {"source": ds.source, "path": ds.path, "options": ds.options, "split": "test", "file": str(path)}
            self._tests[ds.name] = EvalData(read_part(self.data_dir(ds), "test", ds.kind), ds.name, [], about)
        return self._tests[ds.name]

    def reward_judge_config(self, ds):
        from ulma.evaluation.config import RewardJudgeConfig

        j = self.scale.judge
        return RewardJudgeConfig(model=str(self.judge_dir(ds) / "final"), criterion=default_criterion(ds.name),
                                 tie_margin=j.tie_margin, batch_size=j.micro_batch_size, max_length=j.max_length)

    def judge_key(self, ds) -> str:
        """Which judge scores ``ds``, without loading a reward model: a cell judged by another
        is judged again.  A reward judge is named by its folder inside OUT, so that OUT can move."""
        if self.judge.kind == "reward":
            return f"reward:{self.judge_dir(ds).relative_to(self.out)}"
        return self.judge_for(ds).id

    def relative(self, obj, root: str | None = None):
        """``obj`` with the paths inside OUT (or ``root``) written as ``<OUT>/...``: settings
        that survive moving OUT."""
        root = root or str(self.out)
        if isinstance(obj, dict):
            return {k: self.relative(v, root) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.relative(v, root) for v in obj]
        if isinstance(obj, str) and (obj == root or obj.startswith(root + "/")):
            return "<OUT>" + obj[len(root):]
        return obj

    def judge_for(self, ds):
        """The judge of ``ds``, loaded once and kept for all its cells (one data set at a time)."""
        from ulma.evaluation.judges import build_judge

        if ds.name not in self._judges:
            self._judges.clear()  # free the previous data set's judge model
            cfg = self.judge.eval_config().judge
            if self.judge.kind == "reward":
                cfg.reward = self.reward_judge_config(ds)
            self._judges[ds.name] = build_judge(cfg, self.judge_dir(ds) / "judge_cache.sqlite")
        return self._judges[ds.name]


# ------------------------------------------------------------------ configs


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
    ckpt.atomic_write_text(saved, yaml.safe_dump(fingerprint(cfg), sort_keys=False))
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
    from ulma.train import train

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


def _launch_accelerate(scale: Scale):
    def launch(cfg: Config, config_path: Path) -> None:
        subprocess.run(accelerate_command(scale, config_path, cfg.train.resume), check=True)

    return launch


def show_command(cmd: list[str]) -> str:
    """The command as a person would type it."""
    text = " ".join(cmd)
    return text.replace(f"{sys.executable} -m accelerate.commands.launch", "accelerate launch")


# ------------------------------------------------------------------ jobs


class Job:
    """One unit of work with a folder and a completion marker."""

    kind = "job"
    needs: tuple = ()

    def __init__(self, ctx: Context, ds, folder: Path):
        self.ctx, self.ds, self.folder = ctx, ds, Path(folder)

    @property
    def name(self) -> str:
        return str(self.folder.relative_to(self.ctx.out))

    def settings(self) -> dict:
        """What the job is made with; a marker holding other settings is an error."""
        raise NotImplementedError

    def marker(self) -> dict | None:
        path = self.folder / MARKER
        return read_json(path) if path.exists() else None

    def done(self) -> bool:
        return self.marker() is not None

    def check(self) -> None:
        """Fail (naming the first differing setting) if the finished job used other settings."""
        m = self.marker()
        if m is not None:
            check_same(m["settings"], self.ctx.relative(self.settings()), self.name)

    def finish(self, **info) -> None:
        settings = self.ctx.relative(self.settings())
        ckpt.atomic_write_json(self.folder / MARKER, {"settings": settings, "finished": time.time(), **info})

    def describe(self) -> str:
        raise NotImplementedError

    def run(self) -> str:
        raise NotImplementedError


class SplitJob(Job):
    kind = "split"

    def __init__(self, ctx, ds):
        super().__init__(ctx, ds, ctx.data_dir(ds))

    def settings(self) -> dict:
        from ulma.reproduce.splits import identity

        return identity(self.ds, self.ctx.scale.split)

    def marker(self) -> dict | None:
        path = self.folder / "manifest.json"
        return {"settings": read_json(path)["identity"]} if path.exists() else None

    def describe(self) -> str:
        s = self.ctx.scale.split
        where = self.ds.path or f"hub ({self.ds.source})"
        caps = ", ".join(f"{k} {'all' if v is None else f'<= {v}'}" for k, v in
                         (("train", s.train_prompts), ("test", s.test_prompts), ("judge", s.judge_prompts)))
        return (f"split {self.ds.name} ({where}) by prompt into train / test / judge "
                f"(fractions test {s.test_fraction}, judge {s.judge_fraction}; prompts: {caps}; seed {s.seed})")

    def run(self) -> str:
        m = prepare_split(self.ds, self.ctx.scale.split, self.folder)
        c = m["counts"]
        return ", ".join(f"{k} {c[k]['prompts']} prompts / {c[k]['examples']} examples" for k in c)


class JudgeJob(Job):
    """The judge of one data set: for kind "reward", a reward model trained (Bradley-Terry)
    on the judge split; for every kind, its agreement with the human labels of the test split."""

    kind = "judge"

    def __init__(self, ctx, ds, split: SplitJob):
        super().__init__(ctx, ds, ctx.judge_dir(ds))
        self.needs = (split,)

    def config(self) -> Config:
        return reward_config(self.ctx, self.ds, self.ctx.scale.split.seed, self.folder, "judge", judge=True)

    def settings(self) -> dict:
        train = fingerprint(self.config()) if self.ctx.judge.kind == "reward" else None
        return {"judge": self.ctx.judge_key(self.ds), "train": train,
                "agreement_limit": self.ctx.scale.judge.agreement_limit}

    def describe(self) -> str:
        crit = default_criterion(self.ds.name)
        if self.ctx.judge.kind != "reward":
            return f"judge {self.ds.name}: {self.ctx.judge.kind} judge ({crit}); agreement with the test split's human pairs"
        c = self.config()
        return (f"judge {self.ds.name}: reward model ({crit}), {c.reward.loss} on the judge split, "
                f"{c.model.name_or_path} + LoRA r={c.model.lora.r}, lr {c.train.lr}, {c.train.epochs:g} epoch(s), "
                f"max_length {c.data.max_length}; then its agreement with the test split's human pairs")

    def run(self) -> str:
        from ulma.evaluation.judging import judge_agreement
        from ulma.evaluation.testdata import human_pairs

        seconds = train_in(self.ctx, self.config(), self.folder) if self.ctx.judge.kind == "reward" else 0.0
        ctx, s = self.ctx, self.ctx.scale
        pairs = human_pairs(ctx.test_data(self.ds), s.judge.agreement_limit, s.split.seed)
        if not pairs:  # e.g. red-team: one answer per prompt, nothing humans ordered
            self.finish(seconds=round(seconds, 1), agreement=None, pairs=0)
            return f"no human-ordered pairs in the test split: agreement not measured; trained in {seconds:.0f} s"
        summary = judge_agreement(ctx.judge_for(self.ds), pairs, default_criterion(self.ds.name),
                                  self.folder / "agreement", ctx.stats(), self.ds.name, ctx.progress)
        self.finish(seconds=round(seconds, 1), agreement=summary["agree"], pairs=summary["pairs"])
        return (f"agreement with human pairs {summary['agree']:.3f} (ties {summary['tie']:.3f}) over "
                f"{summary['pairs']} pairs; trained in {seconds:.0f} s")


class RewardJob(Job):
    """RLHF's reward model for one (data set, seed), on the policy's training split."""

    kind = "rlhf_reward"

    def __init__(self, ctx, ds, seed: int, split: SplitJob):
        super().__init__(ctx, ds, ctx.reward_dir(ds, seed))
        self.seed, self.needs = seed, (split,)

    def config(self) -> Config:
        return reward_config(self.ctx, self.ds, self.seed, self.folder, "train", judge=False)

    def settings(self) -> dict:
        return fingerprint(self.config())

    def describe(self) -> str:
        c = self.config()
        return (f"rlhf reward model {self.ds.name} seed {self.seed}: reward.loss auto on the training split, "
                f"lr {c.train.lr}, {c.train.epochs:g} epoch(s)")

    def run(self) -> str:
        seconds = train_in(self.ctx, self.config(), self.folder)
        results = read_json(self.folder / "results.json")
        self.finish(seconds=round(seconds, 1))
        after = results.get("after", {})
        return f"{results.get('loss')} loss, held-out pair accuracy {after.get('pair_accuracy')}; {seconds:.0f} s"


class CellJob(Job):
    """One (method, data set, seed): train, then perplexity of the test positives, greedy
    answers to the test prompts, and the judge's verdicts against the reference answers."""

    kind = "cell"

    def __init__(self, ctx, ds, method: str, seed: int, split: SplitJob, judge: JudgeJob,
                 reward: RewardJob | None = None):
        super().__init__(ctx, ds, ctx.cell_dir(ds, method, seed))
        self.method, self.seed = method, seed
        self.needs = (split, judge) + ((reward,) if reward is not None else ())

    def config(self) -> Config:
        if self.method == "rlhf":
            return ppo_config(self.ctx, self.ds, self.seed)
        return policy_config(self.ctx, self.ds, self.method, self.seed)

    def settings(self) -> dict:
        import dataclasses

        return {"train": fingerprint(self.config()), "eval": dataclasses.asdict(self.ctx.scale.eval)}

    def done(self) -> bool:
        """Finished, and judged by this run's judge (a cell judged by another is judged again)."""
        m = self.marker()
        return m is not None and (m.get("inapplicable") is not None or m.get("judge") == self.ctx.judge_key(self.ds))

    def inapplicable(self) -> str | None:
        """Why the method cannot run on this data (DPO on point-wise data without pairs), or None."""
        if not needs_pairs(self.method, self.ds):
            return None
        files = read_json(self.ctx.data_dir(self.ds) / "manifest.json")["files"]
        if "train_pairs.jsonl" in files and "test_pairs.jsonl" in files:
            return None
        return "no prompt has two responses with different labels in both the train and test splits, so DPO has no pairs"

    def _launcher(self):
        if self.ctx.scale.launcher == "accelerate" and self.method in METHODS:
            return _launch_accelerate(self.ctx.scale)
        return None  # reward models and PPO run in one process

    def describe(self) -> str:
        c, s = self.config(), self.ctx.scale
        t, n = c.train, processes(s) if self.method in METHODS else 1
        steps = f"max {t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epoch(s)"
        lora = c.model.lora
        head = (f"cell {self.name}: {self.method}, {c.model.name_or_path} LoRA r={lora.r} alpha={lora.alpha} "
                f"dropout={lora.dropout}, beta={c.method.beta}, ")
        if self.method == "rlhf":
            p = c.ppo
            body = (f"PPO against {Path(p.reward_model).parent.relative_to(self.ctx.out)}: {p.rollout_batch} rollouts "
                    f"per step, {p.ppo_epochs} PPO epochs, {p.max_new_tokens} new tokens, lr {t.lr:g}, {steps}")
        else:
            body = (f"batch {t.micro_batch_size * t.grad_accum * n} = {t.micro_batch_size} x {t.grad_accum} x {n} "
                    f"process(es), lr {t.lr:g} cosine (warmup {t.warmup_ratio:g}), {steps}, max_length "
                    f"{c.data.max_length}, data {Path(c.data.train.path).name}")
        e = s.eval
        tail = (f"; then perplexity of {e.perplexity_limit or 'all'} test positives, greedy answers to "
                f"{e.generate_limit or 'all'} test prompts ({e.max_new_tokens} new tokens), judged")
        cmd = ""
        if self._launcher() is not None:
            cmd = "\n      $ " + show_command(accelerate_command(s, self.folder / "config.yaml"))
        return head + body + tail + cmd

    def run(self) -> str:
        reason = self.inapplicable()
        if reason:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.finish(inapplicable=reason, judge=None)
            return f"n/a: {reason}"
        times = {}
        if self.marker() is not None:  # finished, but judged by another judge: judge again, keep the rest
            for name in (MARKER, "eval/judge_summary.json", "eval/judgments.jsonl"):
                (self.folder / name).unlink(missing_ok=True)
        else:
            times["train"] = train_in(self.ctx, self.config(), self.folder, self._launcher())
            times.update(self._evaluate())
        times["judge"], summary = self._judge()
        ppl = read_json(self.folder / "eval" / "perplexity.json")["perplexity"]
        crit = default_criterion(self.ds.name)
        rates = summary["criteria"][crit]
        times = {k: round(v, 1) for k, v in times.items()}
        self.finish(judge=self.ctx.judge_key(self.ds), seconds=times, perplexity=ppl, win_tie=rates["win_tie"])
        spent = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        return f"perplexity {ppl:.2f}, {crit} win {rates['win']:.3f} tie {rates['tie']:.3f} ({spent})"

    def _evaluate(self) -> dict:
        """Perplexity and generations (each file written whole; generation resumes)."""
        from ulma.evaluation.generate import GenerateConfig, generate_file
        from ulma.evaluation.loading import load_model, resolve_model, run_meta
        from ulma.evaluation.perplexity import write_perplexity
        from ulma.evaluation.testdata import positives, references

        ev, ctx, e, seed = self.folder / "eval", self.ctx, self.ctx.scale.eval, self.ctx.scale.split.seed
        if (ev / "perplexity.json").exists() and (ev / "generations.jsonl").exists():
            return {}
        spec = resolve_model(str(self.folder))
        model, tokenizer = load_model(spec)
        test, meta, times = ctx.test_data(self.ds), run_meta(spec, self.ds.name), {}
        t0 = time.perf_counter()
        if not (ev / "perplexity.json").exists():
            write_perplexity(model, tokenizer, positives(test, e.perplexity_limit, seed), ev, meta=meta,
                             about=test.about, max_length=ctx.max_length(self.ds), batch_size=e.batch_size,
                             progress=ctx.progress)
            times["perplexity"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen = GenerateConfig(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                             max_prompt_length=e.max_prompt_length)
        generate_file(model, tokenizer, references(test, e.generate_limit, seed), ev / "generations.jsonl", gen,
                      {**meta, "data": test.about}, progress=ctx.progress)
        times["generate"] = time.perf_counter() - t0
        return times

    def _judge(self) -> tuple[float, dict]:
        from ulma.evaluation.judging import judge_generations

        ev, judge = self.folder / "eval", self.ctx.judge_for(self.ds)
        path = ev / "judge_summary.json"
        if path.exists():  # judged by this judge before the marker was written (another judge's is deleted)
            return 0.0, read_json(path)
        judge.stats = dict.fromkeys(judge.stats, 0)  # the summary counts this cell's requests only
        t0 = time.perf_counter()
        summary = judge_generations(judge, ev / "generations.jsonl", ev, self.ctx.stats(), "raise", self.ctx.progress)
        return time.perf_counter() - t0, summary
