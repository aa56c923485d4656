"""What every job of a reproduction shares: where OUT is, the scale, the data sets, the
judge (loaded once per data set), the test data (read once), and paths made relative to
OUT so that settings survive moving it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ulma.evaluation.report import default_criterion
from ulma.reproduce.scales import Scale
from ulma.reproduce.splits import read_part



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
    _memos: dict = field(default_factory=dict)  # a released reward judge's scores, by data set
    _tests: dict = field(default_factory=dict)
    _references: dict = field(default_factory=dict)  # the reference model's log-probs of the human pairs

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
        from ulma.evaluation.examples import EvalData

        if ds.name not in self._tests:
            path = self.data_dir(ds) / "test.jsonl"
            about = {"source": ds.source, "path": ds.path, "options": ds.options, "split": "test", "file": str(path)}
            self._tests[ds.name] = EvalData(read_part(self.data_dir(ds), "test", ds.kind), ds.name, [], about)
        return self._tests[ds.name]

    def human_pairs(self, ds) -> list:
        """Every pair of the test split that humans ordered (what preference accuracy is measured on)."""
        from ulma.evaluation.examples import human_pairs

        return human_pairs(self.test_data(ds), None, self.scale.split.seed)

    def reference_pair_logps(self, ds) -> dict:
        """The reference model's (the policies' base) log-probs of :meth:`human_pairs`, once per data set."""
        if ds.name not in self._references:
            from ulma.evaluation.loading import load_model, resolve_model
            from ulma.evaluation.preference import pair_logps

            model, tokenizer = load_model(resolve_model(self.scale.policy.model))
            self._references[ds.name] = pair_logps(model, tokenizer, self.human_pairs(ds), max_length=self.max_length(ds),
                                                   batch_size=self.scale.eval.batch_size, progress=self.progress)
        return self._references[ds.name]

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
            self.release_judge()  # the previous data set's judge model goes first
            cfg = self.judge.eval_config().judge
            if self.judge.kind == "reward":
                cfg.reward = self.reward_judge_config(ds)
            judge = build_judge(cfg, self.judge_dir(ds) / "judge_cache.sqlite")
            if hasattr(judge, "_memo"):
                judge._memo = self._memos.setdefault(ds.name, {})  # survives release_judge
            self._judges[ds.name] = judge
        return self._judges[ds.name]

    def release_judge(self) -> None:
        """Drop the loaded judge (its scores stay): on a GPU, before a training or an evaluation
        needs the memory a 7B reward model holds."""
        self._judges.clear()

    def free_accelerator(self) -> None:
        """On a GPU, release the judge and the cached blocks before the next model loads."""
        import gc

        import torch

        if torch.cuda.is_available():
            self.release_judge()
            gc.collect()
            torch.cuda.empty_cache()
