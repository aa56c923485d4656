"""The plan of a reproduction (which jobs, in which order), its dry-run description, and
running it.

Order: per data set, its split and judge, then seed by seed its cells (RLHF's reward
model before the RLHF cell), so that a partial run already gives whole tables for the
first seeds.  Before anything runs, every job's config is built and validated and every
finished job is checked against this run's settings: a mistake stops the run at start.
A job that fails is reported (its traceback in ``ERROR.txt``) and the jobs that need it
are not run; the rest go on.
"""

from __future__ import annotations

import gc
import sys
import time
import traceback
from dataclasses import dataclass, field

from ulma.config import ConfigError, validate
from ulma.reproduce.experiments import EXTRA_METHODS, MAIN_METHODS, SLOTS, slot_of
from ulma.reproduce.context import Context
from ulma.reproduce.jobs import CellJob, JudgeJob, RewardJob, SplitJob
from ulma.reproduce.scales import processes, scaled_down

METHOD_ORDER = (*MAIN_METHODS, *EXTRA_METHODS, "positive_dpo", "negative_dpo")


@dataclass
class Plan:
    ctx: Context
    tables: list
    seeds: int
    jobs: list = field(default_factory=list)
    not_run: dict = field(default_factory=dict)  # slot -> why it is not run


def select(tables: list, ctx: Context, methods: list | None, datasets: list | None) -> tuple[list, dict]:
    """The slots to run (in the paper's order) and, per slot, its methods; names are checked."""
    slots = [s for s in SLOTS if any(s in t.slots for t in tables)]
    if datasets:
        chosen = {slot_of(d, ctx.slots) for d in datasets}
        bad = chosen - set(slots)
        if bad:
            raise ValueError(f"data set(s) {sorted(bad)} are not in {', '.join(t.name for t in tables)}; "
                             f"choose from {slots}")
        slots = [s for s in slots if s in chosen]
    allowed = [m for m in METHOD_ORDER if any(m in t.methods for t in tables)]
    bad = sorted(set(methods or ()) - set(allowed))
    if bad:
        raise ValueError(f"method(s) {bad} are not in {', '.join(t.name for t in tables)}; choose from {allowed}")
    per_slot = {s: [m for m in allowed if any(s in t.slots and m in t.methods for t in tables)
                    and (not methods or m in methods)] for s in slots}
    return slots, per_slot


def build_plan(ctx: Context, tables: list, seeds: int, methods: list | None = None,
               datasets: list | None = None) -> Plan:
    plan = Plan(ctx, tables, seeds)
    slots, per_slot = select(tables, ctx, methods, datasets)
    for slot in slots:
        ds = ctx.slots[slot]
        if ds.unavailable:
            plan.not_run[slot] = ds.unavailable
            continue
        split = SplitJob(ctx, ds)
        judge = JudgeJob(ctx, ds, split)
        plan.jobs += [split, judge]
        for seed in range(seeds):
            reward = RewardJob(ctx, ds, seed, split) if "rlhf" in per_slot[slot] else None
            plan.jobs += [reward] if reward else []
            plan.jobs += [CellJob(ctx, ds, m, seed, split, judge, reward if m == "rlhf" else None)
                          for m in per_slot[slot]]
    return plan


def preflight(plan: Plan) -> None:
    """Build and validate every config; check every finished job against this run's settings."""
    for job in plan.jobs:
        if hasattr(job, "config"):
            validate(job.config())
        job.check()


def describe(plan: Plan) -> str:
    """What the run will do: the scale, the data sets, and every job with its settings."""
    ctx, s = plan.ctx, plan.ctx.scale
    todo = sum(not j.done() for j in plan.jobs)
    cells = [j for j in plan.jobs if isinstance(j, CellJob)]
    lines = [f"ulma reproduce {', '.join(t.name for t in plan.tables)} at scale {s.name}: {plan.seeds} seed(s), "
             f"{len(cells)} cells, {len(plan.jobs)} jobs ({todo} to run, {len(plan.jobs) - todo} done) in {ctx.out}"]
    p, diffs = s.policy, scaled_down(s)
    lines.append(f"setup: {p.model}, LoRA r={p.lora.r} alpha={p.lora.alpha} dropout={p.lora.dropout}, beta={p.beta}, "
                 f"batch {p.batch_size}, lr {p.lr:g} cosine, {p.epochs:g} epoch, launched {s.launcher} on "
                 f"{processes(s)} process(es)" + ("" if diffs else " (the paper's)"))
    if diffs:
        lines.append("scaled down from the paper: " + "; ".join(f"{k} {a} (paper {b})" for k, a, b in diffs))
    for slot, why in plan.not_run.items():
        lines.append(f"not run: {slot} ({why})")
    for ds in {j.ds.name: j.ds for j in plan.jobs}.values():
        lines.append(f"data set {ds.name}: {ds.note or ds.title}")
    lines += [f"  [{'done' if j.done() else 'todo'}] {j.describe()}" for j in plan.jobs]
    return "\n".join(lines)


def run(plan: Plan, log=print) -> dict:
    """Run every job not done yet; returns {job name: done | skipped | failed | blocked}."""
    status: dict = {}
    total = len(plan.jobs)
    for i, job in enumerate(plan.jobs, 1):
        head = f"[{i}/{total}] {job.name}"
        blocked = [d.name for d in job.needs if status.get(d.name) in ("failed", "blocked")]
        if blocked:
            status[job.name] = "blocked"
            log(f"{head}: not run: it needs {', '.join(blocked)}, which failed")
            continue
        if job.done():
            status[job.name] = "skipped"
            log(f"{head}: done earlier, skipped")
            continue
        status[job.name] = _run_one(job, head, log)
    return status


def _run_one(job, head: str, log) -> str:
    try:
        return _attempt(job, head, log)
    finally:
        gc.collect()  # the job's models (and their reference cycles) go before the next job loads its own


def _attempt(job, head: str, log) -> str:
    t0 = time.perf_counter()
    try:
        line = job.run()
    except (KeyboardInterrupt, ConfigError):
        raise
    except Exception as e:  # one failed cell must not end a run of hours; the rest go on
        job.folder.mkdir(parents=True, exist_ok=True)
        (job.folder / "ERROR.txt").write_text(traceback.format_exc())
        print(traceback.format_exc(), file=sys.stderr)
        log(f"{head}: FAILED ({type(e).__name__}: {e}); traceback in {job.folder / 'ERROR.txt'}")
        return "failed"
    log(f"{head}: {line} [{time.perf_counter() - t0:.0f} s]")
    return "done"
