"""The jobs of a reproduction (split, judge, RLHF reward model, cell) and their completion markers.

Layout of ``OUT``::

    data/<ds>/                 the split (splits.py); manifest.json last
    judge/<ds>/<kind>/         the judge: a reward model trained on the judge split (kind
                               "reward"), and agreement/ with held-out human labels; DONE.json
    rlhf_reward/<ds>/seed<k>/  RLHF's reward model, trained on the policy's training split
    cells/<ds>/<method>/seed<k>/   one training run (config.yaml, metrics.jsonl, results.json,
                               final/) and its evaluation in eval/ (perplexity.json,
                               preference.json, generations.jsonl, judge_summary.json); DONE.json

Each job writes ``DONE.json`` last (atomically), holding the settings it was made with.
A job whose marker exists is skipped; one made with other settings is an error (use
another ``--out``).  An unfinished job is redone cleanly: its training starts over (or
resumes from its newest checkpoint when it has one), its evaluation files, each written
whole, are kept, and generation resumes from its partial log.  A cell whose marker names
another judge keeps its model and generations and is judged again; one that lacks an
evaluation file (made by an older ulma) keeps the rest and computes that file.
"""

from __future__ import annotations

import time
from pathlib import Path

from ulma.atomic import atomic_write_json
from ulma.config import Config
from ulma.evaluation.io import read_json
from ulma.evaluation.report import default_criterion
from ulma.methods import METHODS
from ulma.reproduce.configs import (accelerate_command, accelerate_launcher, fingerprint, needs_pairs,
                                    policy_config, ppo_config, reward_config, show_command, train_in)
from ulma.reproduce.context import Context
from ulma.reproduce.scales import processes
from ulma.reproduce.splits import check_same, prepare_split

MARKER = "DONE.json"


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
        atomic_write_json(self.folder / MARKER, {"settings": settings, "finished": time.time(), **info})

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
        text = ", ".join(f"{k} {c[k]['prompts']} prompts / {c[k]['examples']} examples" for k in c)
        if m["rows_skipped"]:
            text += f"; {m['rows_skipped']} bad rows skipped (first: {m['skipped_first'][0]})"
        return text


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
        from ulma.evaluation.judges import judge_agreement
        from ulma.evaluation.examples import human_pairs

        self.ctx.free_accelerator()
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
        self.ctx.free_accelerator()
        seconds = train_in(self.ctx, self.config(), self.folder)
        results = read_json(self.folder / "results.json")
        self.finish(seconds=round(seconds, 1))
        after = results.get("after", {})
        return f"{results.get('loss')} loss, held-out pair accuracy {after.get('pair_accuracy')}; {seconds:.0f} s"


class CellJob(Job):
    """One (method, data set, seed): train, then perplexity of the test positives, preference
    accuracy on the test split's human pairs, greedy answers to the test prompts, and the
    judge's verdicts against the reference answers."""

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

        evaluation = dataclasses.asdict(self.ctx.scale.eval)
        evaluation.pop("batch_size")  # how many answers are generated at once does not change them
        return {"train": fingerprint(self.config()), "eval": evaluation}

    def done(self) -> bool:
        """Finished, evaluated in full and judged by this run's judge (a cell judged by another is
        judged again)."""
        m = self.marker()
        if m is None or m.get("inapplicable") is not None:
            return m is not None
        return m.get("judge") == self.ctx.judge_key(self.ds) and (self.folder / "eval/preference.json").exists()

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
            return accelerate_launcher(self.ctx.scale)
        # reward models and PPO train in this process (a scale may name an FSDP or DeepSpeed config, which they refuse)
        return None

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
        marker, times = self.marker(), {}
        if marker is not None and marker.get("judge") != self.ctx.judge_key(self.ds):  # judged by another judge
            for name in ("eval/judge_summary.json", "eval/judgments.jsonl"):
                (self.folder / name).unlink(missing_ok=True)
        (self.folder / MARKER).unlink(missing_ok=True)
        self.ctx.free_accelerator()
        times["train"] = train_in(self.ctx, self.config(), self.folder, self._launcher())  # 0 s when trained
        times.update(self._evaluate())  # only the files that are missing
        self.ctx.free_accelerator()  # the policy is gone; the judge loads
        times["judge"], summary = self._judge()
        ppl = read_json(self.folder / "eval" / "perplexity.json")["perplexity"]
        pref = read_json(self.folder / "eval" / "preference.json")["accuracy"]
        crit = default_criterion(self.ds.name)
        rates = summary["criteria"][crit]
        times = {k: round(v, 1) for k, v in times.items()}
        steps = read_json(self.folder / "results.json").get("steps")
        self.finish(judge=self.ctx.judge_key(self.ds), seconds=times, steps=steps, perplexity=ppl,
                    win_tie=rates["win_tie"], preference=pref)
        spent = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        acc = "n/a" if pref is None else f"{pref:.3f}"
        return (f"perplexity {ppl:.2f}, preference accuracy {acc}, {crit} win {rates['win']:.3f} "
                f"tie {rates['tie']:.3f} ({spent})")

    def _evaluate(self) -> dict:
        """Perplexity, preference accuracy and generations, each only if its file is missing (each
        written whole; generation resumes).  The reference model scores the human pairs after the
        policy is gone, so that one model is in memory at a time."""
        from ulma.evaluation.generate import GenerateConfig, generate_file
        from ulma.evaluation.loading import load_model, resolve_model, run_meta
        from ulma.evaluation.perplexity import write_perplexity
        from ulma.evaluation.preference import pair_logps, write_preference
        from ulma.evaluation.examples import positives, references

        ev, ctx, e, seed = self.folder / "eval", self.ctx, self.ctx.scale.eval, self.ctx.scale.split.seed
        todo = [n for n in ("perplexity.json", "preference.json", "generations.jsonl") if not (ev / n).exists()]
        if not todo:
            return {}
        spec = resolve_model(str(self.folder))
        model, tokenizer = load_model(spec)
        test, meta, times, policy = ctx.test_data(self.ds), run_meta(spec, self.ds.name), {}, None
        t0 = time.perf_counter()
        if "perplexity.json" in todo:
            write_perplexity(model, tokenizer, positives(test, e.perplexity_limit, seed), ev, meta=meta,
                             about=test.about, max_length=ctx.max_length(self.ds), batch_size=e.batch_size,
                             progress=ctx.progress)
            times["perplexity"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if "preference.json" in todo:
            policy = pair_logps(model, tokenizer, ctx.human_pairs(self.ds), max_length=ctx.max_length(self.ds),
                                batch_size=e.batch_size, progress=ctx.progress)
            times["preference"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if "generations.jsonl" in todo:
            gen = GenerateConfig(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                 max_prompt_length=e.max_prompt_length)
            generate_file(model, tokenizer, references(test, e.generate_limit, seed), ev / "generations.jsonl", gen,
                          {**meta, "data": test.about}, progress=ctx.progress)
            times["generate"] = time.perf_counter() - t0
        del model
        if policy is not None:
            t0 = time.perf_counter()
            reference = ctx.reference_pair_logps(self.ds)  # the first cell of a data set computes it
            times["preference"] += time.perf_counter() - t0
            write_preference(policy, reference, ev, meta=meta, about=test.about, seconds=times["preference"])
        return times

    def _judge(self) -> tuple[float, dict]:
        from ulma.evaluation.judges import judge_generations

        ev, judge = self.folder / "eval", self.ctx.judge_for(self.ds)
        path = ev / "judge_summary.json"
        if path.exists():  # judged by this judge before the marker was written (another judge's is deleted)
            return 0.0, read_json(path)
        judge.stats = dict.fromkeys(judge.stats, 0)  # the summary counts this cell's requests only
        t0 = time.perf_counter()
        summary = judge_generations(judge, ev / "generations.jsonl", ev, self.ctx.stats(), "raise", self.ctx.progress)
        return time.perf_counter() - t0, summary
