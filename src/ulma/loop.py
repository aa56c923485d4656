"""The frame every training loop runs in: the policy loop (:mod:`ulma.trainer`), the reward
model's (:mod:`ulma.rlhf.reward`) and PPO's (:mod:`ulma.rlhf.ppo`).

Written once here: the step plan (the data order is a pure function of (seed, epoch), so a
run resumed at step k replays what an uninterrupted run would do), the optimizer and its
schedule, ``metrics.jsonl`` rows (and the ``train.report_to`` trackers), the bad-step counter, the evaluation and checkpoint
cadence, resuming, and the order of the final evaluation and save.  A loop supplies one
step, its evaluation, and how it saves, loads and finishes (:class:`Loop`).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from ulma import checkpoint as ckpt, tracking
from ulma.atomic import atomic_write_text
from ulma.data.tokenize import forward_shape
from ulma.errors import ConfigError


class NonFiniteLossError(RuntimeError):
    pass


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    """One process: the first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def data_parallel_accelerator(method: str):
    """The Accelerator of the reward and PPO loops: one process, or plain data parallelism
    (DDP: gloo on the CPU, NCCL on GPUs).  FSDP and DeepSpeed are refused rather than
    half-supported (PPO generates and scores with the whole model in every process)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    acc = Accelerator(cpu=not torch.cuda.is_available())
    if acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise ConfigError(f"method {method}: runs in one process or data-parallel (DDP) processes, "
                          f"not under {acc.distributed_type.value}")
    return acc


def non_finite(*values) -> bool:
    return not all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)


# ------------------------------------------------------------------ the plan


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio`` (nanoGPT's get_lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_plan(units, micro: int, world: int, seed: int, epoch: int, group_by_length: bool,
               packed: bool = False, hidden: int = 0, multiple: int = 1) -> list[list[int]]:
    """Global micro-batches (``micro * world`` units each) for one epoch.

    Shuffled with a generator seeded by (seed, epoch); with ``group_by_length`` the
    shuffled order is cut into windows of 32 micro-batches that are sorted by length,
    which cuts padding while keeping the order random at the window level, and the
    heaviest micro-batch runs first, as transformers' LengthGroupedSampler does: a run that
    will not fit in memory fails at its first step, and its first steps show its peak.
    ``packed``: rows that share a prompt run as one packed row (logprobs.pack_prompts,
    ``hidden`` the model's width): a pair's length is its packed width, and a micro-batch
    weighs what its forward runs.  ``multiple``: widths rounded up as batches pad them.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(units), generator=g).tolist()
    size = micro * world
    if group_by_length:
        length = {i: units.length(i, packed) for i in order}
        window = size * 32
        order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=length.get)]
    batches = [order[s : s + size] for s in range(0, len(order), size)]
    if group_by_length and batches:
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
        k = max(range(len(batches)), key=lambda j: batch_weight(units, batches[j], world, packed, hidden, multiple))
        batches[0], batches[k] = batches[k], batches[0]
    return batches


def batch_weight(units, mb: list[int], world: int = 1, packed: bool = False, hidden: int = 0,
                 multiple: int = 1) -> tuple[int, int]:
    """What a global micro-batch asks of memory: the most positions (rows x width) one
    process's forward runs (:func:`ulma.data.tokenize.forward_shape` of its share), then the
    batch's tokens (ties)."""
    seqs = units.table.sequences
    positions = 0
    for rank in range(world):
        share = my_share(mb, rank, world)[0]
        rows, width = forward_shape([seqs[r] for r in units.batch_rows(share)], packed, hidden, multiple)
        positions = max(positions, rows * width)
    return positions, sum(len(seqs[r].input_ids) for r in units.batch_rows(mb))


def step_plan(units, needed: int, micro: int, world: int, seed: int, group_by_length: bool,
              packed: bool = False, hidden: int = 0, multiple: int = 1) -> list[list[int]]:
    """The run's first ``needed`` global micro-batches, epoch after epoch (:func:`epoch_plan`)."""
    plan, epoch = [], 0
    while len(plan) < needed:
        plan += epoch_plan(units, micro, world, seed, epoch, group_by_length, packed, hidden, multiple)
        epoch += 1
    return plan[:needed]


def my_share(mb: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """This process's slice of a global micro-batch, and 1.0 (or 0.0 for a stand-in).

    Every process must run every backward (DDP all-reduces in it); a process whose slice of
    a short final micro-batch is empty runs one unit with weight 0.
    """
    size = math.ceil(len(mb) / world)
    mine = mb[rank * size : (rank + 1) * size]
    return (mine, 1.0) if mine else (mb[:1], 0.0)


def total_steps(train_cfg, batches_per_epoch: float, batches_per_step: int = 1) -> int:
    """``train.max_steps``, else the optimizer steps of ``train.epochs`` (at least one)."""
    if train_cfg.max_steps:
        return train_cfg.max_steps
    return max(1, math.ceil(train_cfg.epochs * batches_per_epoch / batches_per_step))


def fused_adamw(params: list, wanted: bool) -> dict:
    """AdamW's keyword for torch's fused kernel, ``{"fused": True}``, where ``wanted`` and it
    applies (every parameter on one CPU or CUDA device); else ``{}``."""
    devices = {p.device.type for p in params}
    return {"fused": True} if wanted and len(devices) == 1 and devices <= {"cpu", "cuda"} else {}


def make_optimizer(params: list, train_cfg, total: int, fused_ok: bool = True):
    """AdamW and its schedule: linear warmup, cosine to ``lr * min_lr_ratio`` over ``total``
    updates.  ``train.fused_optimizer``: torch's fused AdamW (one kernel over all parameters)
    where ``fused_ok`` (not under FSDP or DeepSpeed) and :func:`fused_adamw` allows."""
    t = train_cfg
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999),
                                  **fused_adamw(params, t.fused_optimizer and fused_ok))
    warmup = int(t.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, t.min_lr_ratio))
    return optimizer, scheduler


# ------------------------------------------------------------------ metrics rows


class StepRows:
    """``train.log_every``: one metrics row per ``every`` optimizer steps, and one at each
    checkpoint (every ``save_every`` steps) and at the last step, ``total``, so the rows a
    resumed run keeps are those of an uninterrupted run.  A row of several steps holds the
    mean of each numeric metric over them (None where no step had it: a step without
    positives has no ``loss_pos``), the sum of ``seconds`` and of the counts ``skipped`` /
    ``skipped_updates``, the ``step`` and ``lr`` of its last step, and ``steps``, how many it
    covers.  ``every == 1``: each step's own row, unchanged."""

    LAST = ("step", "lr")
    SUM = ("seconds", "skipped", "skipped_updates")

    def __init__(self, every: int, save_every: int, total: int):
        self.every, self.save_every, self.total, self.pending = every, save_every, total, []

    def add(self, row: dict) -> dict | None:
        """Takes one step's row; returns the row to write now, or None."""
        if self.every == 1:
            return row
        self.pending.append(row)
        step = row["step"]
        if not (step % self.every == 0 or step == self.total or (self.save_every and step % self.save_every == 0)):
            return None
        rows, self.pending = self.pending, []
        out = {}
        for k in dict.fromkeys(k for r in rows for k in r):
            values = [r[k] for r in rows if r.get(k) is not None]
            if k in self.LAST or not all(isinstance(v, (int, float)) for v in values):
                out[k] = rows[-1].get(k)
            elif k in self.SUM:
                out[k] = sum(values)
            else:
                out[k] = sum(values) / len(values) if values else None
        return {**out, "steps": len(rows)}


# ------------------------------------------------------------------ the loop


class Loop:
    """The loop of one run.  A subclass sets ``cfg``, ``out`` (the output folder) and
    ``total_steps``, and implements:

    - ``train_step(step) -> row``: one optimizer step; the row's ``skipped`` says whether
      its update was skipped (a non-finite loss or gradient);
    - ``evaluate(step) -> metrics``, which also logs them (:meth:`_log`);
    - ``save(step, results)``, ``load(checkpoint) -> state.json`` and ``finish(results)``.
    """

    desc = "train"  # the progress bar's label
    trackers = None  # train.report_to's trackers, started with the run's first step (:meth:`start_trackers`)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (one process: always)."""
        return True

    def one_step(self, step: int) -> dict:
        return self.train_step(step)

    def evaluate_before(self) -> dict:
        return self.evaluate(0)

    def train_mode(self) -> None:
        """Called before the first step (after the "before" evaluation)."""

    def postfix(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.4f}"}

    def start_trackers(self, step: int) -> list:
        """The trackers of ``train.report_to`` (:mod:`ulma.tracking`) for a run that starts at ``step``."""
        if not (self.is_main and self.cfg.train.report_to):
            return []
        from ulma.config import to_dict

        return tracking.start_trackers(self.cfg.train.report_to, self.out, to_dict(self.cfg), step)

    def checkpoint_to_resume(self) -> Path | None:
        return ckpt.latest_checkpoint(self.out) if self.cfg.train.resume else None

    def run(self) -> dict:
        from tqdm.auto import tqdm

        t = self.cfg.train
        start, results = self._resume()
        if start == 0:
            results["before"] = self.evaluate_before()
        self.train_mode()
        rows = StepRows(t.log_every, t.save_every, self.total_steps)
        bad, self.skipped_steps = 0, 0
        bar = tqdm(range(start, self.total_steps), initial=start, total=self.total_steps, desc=self.desc,
                   disable=not (t.progress and self.is_main), dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            row = self.one_step(step)
            bad = bad + 1 if row["skipped"] else 0
            self.skipped_steps += bool(row["skipped"])
            if bad >= t.max_bad_steps:
                raise NonFiniteLossError(
                    f"step {step + 1}: loss or gradients non-finite {bad} steps in a row "
                    f"(train.max_bad_steps={t.max_bad_steps}); stopping. The last checkpoint is intact.")
            done = step + 1
            row.update(step=done, seconds=round(time.perf_counter() - t0, 3))
            bar.set_postfix(self.postfix(row))
            if (out := rows.add(row)) is not None:
                self._log(out)
            if t.eval_every and done % t.eval_every == 0 and done < self.total_steps:
                self.evaluate(done)
            if (t.save_every and done % t.save_every == 0) or done == self.total_steps:
                self.save(done, results)
        results["after"] = self.evaluate(self.total_steps)
        results = self.finish(results)
        tracking.finish_trackers(self.trackers or [])
        return results

    def _resume(self) -> tuple[int, dict]:
        """(first step, results so far): from the newest checkpoint with ``train.resume``,
        else (0, {}); metric rows after that step are dropped (the run writes them again)."""
        found = self.checkpoint_to_resume()
        state = {"step": 0} if found is None else self.load(found)
        self._truncate_metrics(state["step"])
        if self.trackers is None:
            self.trackers = self.start_trackers(state["step"])
        return state["step"], state.get("results", {})

    def _log(self, row: dict) -> None:
        """The one place a metrics row is written: appended to ``OUTPUT/metrics.jsonl`` and
        given to the trackers."""
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is None:
            self.trackers = self.start_trackers(0)
        for tracker in self.trackers:
            tracker.log(tracking.tracker_values(row), step=row["step"])

    def _truncate_metrics(self, step: int) -> None:
        path = self.out / "metrics.jsonl"
        if not (self.is_main and path.exists()):
            return
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(r + "\n" for r in rows))


class DataParallelLoop(Loop):
    """A loop over accelerate's processes (``self.acc``, ``self.model`` wrapped by DDP): the main
    process writes checkpoints, the others wait for it."""

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def inner(self):
        """The model without DDP's wrapper (forwards without collectives, saving)."""
        return self.acc.unwrap_model(self.model)

    def save(self, step: int, results: dict) -> None:
        if self.is_main:
            ckpt.save_checkpoint(self.out, step, self.inner, self.tokenizer, self.optimizer, self.scheduler,
                                 {"step": step, "results": results}, keep=self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()
