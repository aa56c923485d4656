"""The one training loop, for every method (on accelerate).

One optimizer step = ``grad_accum`` micro-batches per process.  Positives and negatives
are counted over the whole step (all micro-batches, all processes) *before* the forward
passes, so the balanced reduction (:func:`ulma.losses.group_mean`) is the exact global
mean of means however the step is split.  The data order is a pure function of
(seed, epoch), so resuming at step k replays exactly what an uninterrupted run would do.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
import random
import time
from pathlib import Path

import torch

from ulma import checkpoint as ckpt
from ulma.backward_step import BackwardStep
from ulma.config import Config, ConfigError, to_dict, validate
from ulma.data.prepare import prepare
from ulma.data.tokenize import collate
from ulma.evaluation.metrics import evaluate, table_logps
from ulma.logprobs import attention_kernels, forward_logps, reduce_logps, use_bf16
from ulma.losses import group_mean
from ulma.memory import release as release_memory
from ulma.methods import METHODS, LossInputs
from ulma.models import Reference, is_peft, load_policy, load_tokenizer, trainable_parameters


class NonFiniteLossError(RuntimeError):
    pass


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio`` (nanoGPT's get_lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_plan(units, micro: int, world: int, seed: int, epoch: int, group_by_length: bool,
               packed: bool = False) -> list[list[int]]:
    """Global micro-batches (``micro * world`` units each) for one epoch.

    Shuffled with a generator seeded by (seed, epoch); with ``group_by_length`` the
    shuffled order is cut into windows of 32 micro-batches that are sorted by length,
    which cuts padding while keeping the order random at the window level.  ``packed``
    (shared prompts): a pair's length is its packed width, prompt + both responses, the
    width of the row it runs as.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(units), generator=g).tolist()
    size = micro * world
    if group_by_length:
        window = size * 32
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s : s + window], key=lambda i: units.length(i, packed))]
    batches = [order[s : s + size] for s in range(0, len(order), size)]
    if group_by_length:
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
    return batches


def make_accelerator():
    """The run's Accelerator; FSDP2 and DeepSpeed ZeRO also on the CPU (gloo).

    accelerate turns an FSDP config into FSDP only on GPU-like devices: with
    ``use_cpu: true`` it silently runs plain DDP instead.  FSDP2 (``fully_shard``) itself
    runs on the CPU over gloo, so a multi-process CPU run launched with an FSDP config is
    switched to accelerate's FSDP2 path here (for tests and debugging without a GPU).
    FSDP1 cannot compute on the CPU (its compute device is always a GPU): an error.
    DeepSpeed is only used by accelerate with ``cpu=False``; on the CPU it then needs the
    process counts fixed.
    """
    import os

    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wants_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    acc = Accelerator(cpu=not torch.cuda.is_available() and not wants_deepspeed)
    if wants_deepspeed and not torch.cuda.is_available() and acc.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed's CPU accelerator (gloo without oneCCL) runs ZeRO on the CPU, but accelerate
        # counts 1 process there: take the counts from the process group it initialised.
        import torch.distributed as dist

        counts = {"num_processes": dist.get_world_size(), "process_index": dist.get_rank(),
                  "local_process_index": int(os.environ.get("LOCAL_RANK", 0))}
        PartialState._shared_state.update(counts)
        acc.state.__dict__.update(counts)
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and acc.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # read from the same environment accelerate launch set
        if plugin.fsdp_version != 2:
            raise RuntimeError("FSDP on the CPU needs fsdp_version: 2 (FSDP1 computes on GPUs only); "
                               "see configs/accelerate/fsdp_cpu.yaml")
        acc.state.fsdp_plugin = plugin
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does on GPUs
    return acc


def fused_adamw(params: list, wanted: bool) -> dict:
    """AdamW's keyword for torch's fused kernel, ``{"fused": True}``, where ``wanted`` and it
    applies (every parameter on one CPU or CUDA device); else ``{}``."""
    devices = {p.device.type for p in params}
    return {"fused": True} if wanted and len(devices) == 1 and devices <= {"cpu", "cuda"} else {}


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


def _input_requires_grad(module, args, out: torch.Tensor) -> None:
    """Forward hook: the output needs a gradient wherever autograd records (see Trainer._compile)."""
    if torch.is_grad_enabled():
        out.requires_grad_(True)


class Trainer:
    """Holds the pieces of one run; :meth:`run` is the loop."""

    def __init__(self, cfg: Config):
        validate(cfg)
        self.cfg = cfg
        self.method = METHODS[cfg.method.name]
        self.acc = make_accelerator()
        self.out = Path(cfg.train.output_dir)
        ckpt.prepare_output(self.out, resume=cfg.train.resume, overwrite=cfg.train.overwrite,
                            delete=self.acc.is_main_process)
        self.acc.wait_for_everyone()
        self.resume_from = ckpt.latest_checkpoint(self.out) if cfg.train.resume else None
        set_seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.model.name_or_path)
        self.data = prepare(cfg, self.tokenizer, self.method)
        self.bf16 = use_bf16(cfg.train.bf16, self.acc.device)
        # train.bf16_frozen_weights: under bf16 autocast, LoRA's frozen base layers and a live
        # reference copy keep their Linear weights in bf16 (the same products, half their memory:
        # 2.35 of the 4.7 GB of a 1.17B model's float32 weights).  Not under FSDP or DeepSpeed,
        # which keep their own flat parameter buffers of one dtype.
        frozen = self.bf16 and cfg.train.bf16_frozen_weights and not (self.fsdp or self.deepspeed)
        frozen = torch.bfloat16 if frozen else None
        self.model = load_policy(cfg.model, self.acc.device, frozen)
        if cfg.train.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and no_sync
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ckpt.check_space(self.out, self.model, self.tokenizer, cfg.train.keep_checkpoints)
        keep_copy = cfg.model.reference == "live" and self.method.needs_reference
        self.reference = Reference(self.model, keep_copy=keep_copy, frozen_dtype=frozen)
        self._compile()
        if self.reference.copy is not None and self.fsdp:
            self._broadcast(self.reference.copy)
        if self.resume_from is not None:
            self._check_resumable(self.resume_from)
        if self.resume_from is not None and not self.deepspeed:  # before sharding: a plain load of the full weights
            ckpt.load_weights(self.model, self.resume_from / "model")
        self.pad_id = self.tokenizer.pad_token_id
        self._setup_optimizer()
        if self.fsdp:  # FSDP1 wraps the model (FSDP2 shards it in place): pi_ref runs through the wrapper
            self.reference.policy = self.model
        self.plan = self._plan()

    def _compile(self) -> None:
        """``train.compile``: each decoder layer of the policy (and of a live reference copy)
        through ``torch.compile`` (:func:`ulma.models.compile_layers`).  Compilation happens
        at the first batch of each kind (training with gradients, reference/evaluation without).
        Under FSDP2 the layers are compiled before prepare() shards them, as torchtune does:
        dynamo leaves FSDP's all-gather hooks out of the graph (``skip_fsdp_hooks``) and the
        graph sees each layer's gathered weights.  FSDP1's flat parameters and DeepSpeed's
        engine are not supported."""
        from ulma.models import compile_layers

        self.compiled_layers = 0  # the policy's, reported in results.json
        if not self.cfg.train.compile:
            return
        if self.deepspeed or (self.fsdp and self.acc.state.fsdp_plugin.fsdp_version != 2):
            raise ValueError("train.compile: supported under FSDP2 (fsdp_version: 2) and DDP, not under FSDP1 "
                             "or DeepSpeed (set it to false)")
        embedding = self.model.get_input_embeddings()
        if any(not p.requires_grad for p in embedding.parameters()):
            # LoRA: the embedding is frozen, so the first layer's input would need no gradient
            # and the later layers' would: two graphs of one layer.  One, with a gradient (but
            # not under no_grad, where no layer's input has one; Hugging Face's
            # enable_input_require_grads sets it there too).
            embedding.register_forward_hook(_input_requires_grad)
        self.compiled_layers = compile_layers(self.model, self.cfg.train.compile_backend, self.cfg.train.compile_mode)
        if self.reference.copy is not None:
            compile_layers(self.reference.copy, self.cfg.train.compile_backend, self.cfg.train.compile_mode)

    @property
    def fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.acc.distributed_type == DistributedType.FSDP

    def _broadcast(self, module) -> None:
        """Process 0's weights into ``module`` everywhere.  With FSDP's cpu_ram_efficient_loading
        only process 0 loads the checkpoint (the others hold zeros until prepare() broadcasts
        it into the policy), so a frozen reference copied before prepare() needs this."""
        import torch.distributed as dist

        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)

    @property
    def deepspeed(self) -> bool:
        return self.acc.distributed_type.value == "DEEPSPEED"

    def _distributed_name(self) -> str:
        """How the run was distributed, as accelerate names it (NO, MULTI_CPU, MULTI_GPU, DEEPSPEED, FSDP, FSDP2)."""
        name = self.acc.distributed_type.value
        return "FSDP2" if self.fsdp and self.acc.is_fsdp2 else name

    def _eval_model(self):
        """The module to run gradient-free forwards on: under DDP the inner module (no
        collectives), under FSDP the sharded model itself (it gathers its weights)."""
        return self.model if self.fsdp else self.acc.unwrap_model(self.model)

    # ------------------------------------------------------------------ setup
    def _setup_optimizer(self) -> None:
        t = self.cfg.train
        params = trainable_parameters(self.model)
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999),
                                           **self._fused_optimizer(params))
        self.total_steps = self._total_steps()
        warmup = int(t.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, t.min_lr_ratio)
        )
        if self.deepspeed:  # no dataloader goes through prepare() to tell DeepSpeed the batch size
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
            ds["gradient_clipping"] = t.max_grad_norm or 0.0  # DeepSpeed clips inside its engine (0: not)
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.in_backward = None
        if t.optimizer_in_backward:
            if self.acc.num_processes > 1 or self.fsdp or self.deepspeed:
                raise ConfigError("train.optimizer_in_backward: one process only (gradients are applied in the "
                                  "backward, before any all-reduce of them across processes)")
            inner = getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper
            self.in_backward = BackwardStep(inner, params, fused=bool(inner.defaults.get("fused")))

    def _micro_per_epoch(self) -> int:
        size = self.cfg.train.micro_batch_size * self.acc.num_processes
        return math.ceil(len(self.data.train) / size)

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        return max(1, math.ceil(t.epochs * self._micro_per_epoch() / t.grad_accum))

    def _plan(self) -> list[list[int]]:
        t = self.cfg.train
        needed = self.total_steps * t.grad_accum
        plan, epoch = [], 0
        while len(plan) < needed:
            plan += epoch_plan(self.data.train, t.micro_batch_size, self.acc.num_processes, t.seed, epoch,
                               t.group_by_length, packed=t.share_prompts)
            epoch += 1
        return plan[:needed]

    def _fused_optimizer(self, params: list) -> dict:
        """{"fused": True} where torch's fused AdamW applies: one kernel over all parameters
        instead of a loop of per-op kernels.  Measured: 0.60 -> 0.08 s per step for
        SmolLM2-135M on a 2-core CPU, 36 -> 15 ms for 1.17B parameters on an H100.  Not
        under FSDP or DeepSpeed (sharded parameters; DeepSpeed steps its own way)."""
        wanted = self.cfg.train.fused_optimizer and not self.fsdp and not self.deepspeed
        return fused_adamw(params, wanted)

    # ------------------------------------------------------------------ one step
    def _inputs(self, batch: dict, ref: dict | None) -> LossInputs:
        m = self.cfg.method
        t = self.cfg.train
        out = forward_logps(self.model, batch, bf16=self.bf16, need_tokens=self.method.token_level,
                            fused=t.fused_logps, share_prompts=t.share_prompts)
        policy = reduce_logps(out["sum"], out["count"], m.logp_reduction)
        ref_logps = None
        if self.method.needs_reference:
            ref_logps = self._reference_logps(batch, ref)
        dev = policy.device
        return LossInputs(
            policy, ref_logps, batch["labels"].to(dev), batch["positive"].to(dev), self.data.train.binary,
            out.get("tokens"), out.get("mask"),
        )

    def _reference_logps(self, batch: dict, ref: dict | None) -> torch.Tensor:
        m = self.cfg.method
        if ref is not None:
            total, count = batch["ref_sum"], batch["ref_count"]
        else:
            with self.reference.model() as net:
                r = forward_logps(net, batch, bf16=self.bf16, fused=self.cfg.train.fused_logps,
                                  share_prompts=self.cfg.train.share_prompts)
            total, count = r["sum"], r["count"]
        dev = self.acc.device
        return reduce_logps(total.to(dev), count.to(dev), m.logp_reduction)

    def train_step(self, step: int, ref: dict | None) -> dict:
        """One optimizer step over this process's share of the step's micro-batches."""
        t, m = self.cfg.train, self.cfg.method
        micro = self.plan[step * t.grad_accum : (step + 1) * t.grad_accum]
        units = self.data.train
        pos = sum(units.positive[i] for mb in micro for i in mb)
        neg = sum(len(mb) for mb in micro) - pos
        world = self.acc.num_processes
        sums = torch.zeros(3, dtype=torch.float64, device=self.acc.device)  # loss, pos and neg loss sums
        for k, mb in enumerate(micro):
            mine, share = self._my_share(mb)
            batch = collate(units, mine, self.pad_id, ref)
            inp = self._inputs(batch, ref)
            losses, _ = self.method.loss(inp, m)
            losses = losses * share
            loss = group_mean(
                losses, inp.positive, n_pos=pos, n_neg=neg, pos_weight=m.pos_weight, neg_weight=m.neg_weight,
                balance=m.balance,
            )
            # DDP averages gradients over processes; our loss is already a global mean.
            last = k == len(micro) - 1
            ctx = self.acc.no_sync(self.model) if not last else nullcontext()
            if self.deepspeed:  # accelerate's DeepSpeed backward steps the engine whenever gradients
                self.acc.sync_gradients = last  # sync: only after the step's last micro-batch
            with ctx, attention_kernels():  # checkpointed recomputes pick the forward's kernels
                self.acc.backward(loss * world)
            # Summed on the device, read once per step: .item() per micro-batch would make the
            # CPU wait for the GPU each time.  where(), not a boolean index: that waits too.
            d = losses.detach()
            sums += torch.stack([loss.detach(), d.where(inp.positive, 0.0).sum(), d.where(~inp.positive, 0.0).sum()])
        loss_sum, pos_sum, neg_sum = sums.tolist()
        stats = {"loss": loss_sum, "pos_loss_sum": pos_sum, "neg_loss_sum": neg_sum, "n_pos": pos, "n_neg": neg}
        return self._apply_update(self._sum_over_processes(stats))

    def _my_share(self, mb: list[int]) -> tuple[list[int], float]:
        """This process's slice of a global micro-batch, and 1.0 (or 0.0 for a stand-in).

        Every process must run every backward (DDP all-reduces in it); a process whose
        slice of a short final micro-batch is empty runs one unit with weight 0.
        """
        rank, world = self.acc.process_index, self.acc.num_processes
        size = math.ceil(len(mb) / world)
        mine = mb[rank * size : (rank + 1) * size]
        return (mine, 1.0) if mine else (mb[:1], 0.0)

    def _sum_over_processes(self, stats: dict) -> dict:
        """Each process holds its share of the step's sums; the logged numbers are global."""
        if self.acc.num_processes == 1:
            return stats
        keys = ("loss", "pos_loss_sum", "neg_loss_sum")
        summed = self.acc.reduce(torch.tensor([stats[k] for k in keys], device=self.acc.device), "sum")
        return {**stats, **{k: float(v) for k, v in zip(keys, summed.tolist())}}

    def _apply_update(self, stats: dict) -> dict:
        """Clip, step and schedule (a step whose loss or gradient norm is not finite is
        skipped); with ``train.optimizer_in_backward`` the updates were applied in the
        backward already, and a parameter with a non-finite gradient kept its weights."""
        if self.in_backward is not None:
            grad_norm, left = self.in_backward.finish()
            finite = math.isfinite(stats["loss"]) and not left and bool(torch.isfinite(grad_norm))
        else:
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm or math.inf)
            if grad_norm is None:  # DeepSpeed clips inside its engine and may not report the norm
                grad_norm = float("nan")
                finite = math.isfinite(stats["loss"])
            else:
                finite = math.isfinite(stats["loss"]) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {
            "loss": stats["loss"],
            "loss_pos": stats["pos_loss_sum"] / stats["n_pos"] if stats["n_pos"] else None,
            "loss_neg": stats["neg_loss_sum"] / stats["n_neg"] if stats["n_neg"] else None,
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            "skipped": not finite,
        }

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        from tqdm.auto import tqdm

        t = self.cfg.train
        ref_train, ref_eval = self._reference_caches()
        release_memory()  # the pass's freed batches: not resident through the steps (ulma.memory)
        start, results = self._maybe_resume()
        if start == 0:  # the reference IS the initial policy: its log-probs are the "before" numbers
            results["before"] = self._evaluate(ref_eval, 0, policy_logps=ref_eval)
        bar = tqdm(range(start, self.total_steps), initial=start, total=self.total_steps, desc="train",
                   disable=not (t.progress and self.acc.is_main_process), dynamic_ncols=True)
        self.model.train()
        bad_in_a_row, self.skipped_steps = 0, 0
        rows = StepRows(t.log_every, t.save_every, self.total_steps)
        for step in bar:
            t0 = time.perf_counter()
            row = self.train_step(step, ref_train)
            bad_in_a_row = bad_in_a_row + 1 if row["skipped"] else 0
            self.skipped_steps += row["skipped"]
            if bad_in_a_row >= t.max_bad_steps:
                raise NonFiniteLossError(
                    f"step {step + 1}: loss or gradients non-finite {bad_in_a_row} steps in a row "
                    f"(train.max_bad_steps={t.max_bad_steps}); stopping. The last checkpoint is intact."
                )
            row.update(step=step + 1, seconds=round(time.perf_counter() - t0, 3))
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            done = step + 1
            if (out := rows.add(row)) is not None:
                self._log(out)
            if t.eval_every and done % t.eval_every == 0 and done < self.total_steps:
                self._evaluate(ref_eval, done)
                release_memory()
            if (t.save_every and done % t.save_every == 0) or done == self.total_steps:
                self._save(done, results)
                release_memory()
        results["after"] = self._evaluate(ref_eval, self.total_steps)
        return self._finish(results)

    def _reference_caches(self):
        """Reference log-probs computed once, before any update (and kept on disk for resume)."""
        path = self.out / "reference_logps.pt"
        if self.cfg.train.resume and path.exists():
            cached = torch.load(path)
            return cached["train"], cached["eval"]
        need_train = self.method.needs_reference and self.cfg.model.reference == "precompute"
        if self.resume_from is not None and self.reference.copy is None and not is_peft(self.reference.policy):
            raise RuntimeError(f"{path} is missing: the reference log-probs cannot be recomputed from the resumed "
                               "(trained) weights; start the run again without train.resume")
        with self.reference.model() as net:
            train = self._table_logps(net, self.data.train.table, "reference log-probs") if need_train else None
            evals = self._table_logps(net, self.data.eval.table, "reference log-probs (held out)")
        if self.acc.is_main_process:
            ckpt.atomic_torch_save({"train": train, "eval": evals}, path)
        return train, evals

    def _table_logps(self, net, table, desc: str) -> dict:
        """Log-probs of every row of ``table``, each process scoring every world-th row,
        then summed over processes: evaluation work is done once, not once per process."""
        rank, world = self.acc.process_index, self.acc.num_processes
        show = self.cfg.train.progress and self.acc.is_main_process
        size = self.cfg.train.forward_rows(self.acc.device.type)
        out = table_logps(net, table, self.pad_id, size, self.bf16, rows=list(range(rank, len(table), world)),
                          desc=desc, progress=show, min_batches=math.ceil(math.ceil(len(table) / world) / size),
                          fused=self.cfg.train.fused_logps, share_prompts=self.cfg.train.share_prompts)
        if world > 1:
            out = {k: self.acc.reduce(v.to(self.acc.device), "sum").cpu() for k, v in out.items()}
        return out

    def _evaluate(self, ref_eval: dict, step: int, policy_logps: dict | None = None) -> dict:
        if policy_logps is None:
            policy_logps = self._table_logps(self._eval_model(), self.data.eval.table, "evaluate")
        metrics = evaluate(self.model, self.data.eval, ref_eval, self.method, self.cfg, self.pad_id, self.bf16,
                           policy_logps=policy_logps)
        self._log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        return metrics

    def _log(self, row: dict) -> None:
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _nonfinite_weights(self) -> list[str]:
        """Trainable weights holding NaN/inf, in any process's shard (the same answer everywhere)."""
        bad = []
        for n, p in self.model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 DTensor: this process's shard
            if p.requires_grad and not torch.isfinite(local).all():
                bad.append(n)
        if self.acc.num_processes > 1:
            count = self.acc.reduce(torch.tensor([len(bad)], device=self.acc.device), "sum")
            if int(count) and not bad:
                bad = ["(in another process's shard)"]
        return bad

    def _save(self, step: int, results: dict) -> None:
        bad = self._nonfinite_weights()
        if bad:  # never write a NaN checkpoint: the last good one stays the newest
            raise NonFiniteLossError(f"step {step}: non-finite weights in {bad[:3]}; checkpoint not written")
        state_dict = self._full_state_dict()
        optimizer_state = self._full_optimizer_state()
        tmp = self._save_engine(step) if self.deepspeed else None
        if self.acc.is_main_process:
            state = {"step": step, "results": results, "launch": self._launch()}
            ckpt.save_checkpoint(self.out, step, self.acc.unwrap_model(self.model), self.tokenizer,
                                 self.optimizer, self.scheduler, state, keep=self.cfg.train.keep_checkpoints,
                                 state_dict=state_dict, optimizer_state=optimizer_state, tmp=tmp)
        self.acc.wait_for_everyone()

    def _launch(self) -> dict:
        """How this run is launched, as far as a checkpoint depends on it."""
        launch = {"distributed": self._distributed_name(), "processes": self.acc.num_processes}
        if self.deepspeed:
            launch["zero_stage"] = self.acc.state.deepspeed_plugin.zero_stage
        return launch

    def _save_engine(self, step: int) -> Path:
        """DeepSpeed's own checkpoint of the engine (every process writes its optimizer
        partition) into the staging folder of the step's checkpoint: ZeRO's partitions
        cannot be gathered into one optimizer state the way FSDP's can."""
        from accelerate.utils import broadcast_object_list

        tmp = [ckpt.staging_dir(self.out, step) if self.acc.is_main_process else None]
        broadcast_object_list(tmp)
        self.model.save_checkpoint(str(tmp[0] / "deepspeed"), tag="engine", save_latest=False,
                                   exclude_frozen_parameters=True)
        self.acc.wait_for_everyone()
        return tmp[0]

    def _full_state_dict(self) -> dict:
        """The model's full state dict (all processes take part: gathers shards under
        ZeRO-3/FSDP).  Gathered weights no longer share storage, so a tied copy (lm_head =
        embeddings) would be saved twice: dropped here, as save_pretrained does for shared ones."""
        state_dict = self.acc.get_state_dict(self.model)  # None on processes > 0 under ZeRO-3
        for target, source in getattr(self.acc.unwrap_model(self.model), "all_tied_weights_keys", {}).items():
            if state_dict and target in state_dict and source in state_dict:
                del state_dict[target]
        return state_dict

    def _full_optimizer_state(self) -> dict | None:
        """Under FSDP each process holds its shard of the optimizer state: gathered here (all
        processes take part) into one full state keyed by parameter name, which any number
        of processes can load.  Under DeepSpeed a pointer to the engine's checkpoint (its
        partitions are saved there).  None elsewhere: the optimizer's own state is complete."""
        if self.deepspeed:
            return {"deepspeed": "the optimizer partitions are in deepspeed/engine/"}
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def _load_optimizer_state(self, saved: dict) -> None:
        """The saved optimizer state into this run's optimizer: a state keyed by parameter
        name (written under FSDP) is scattered to the shards; one keyed by position (written
        by 1 process or DDP) is loaded as is, or renamed first when this run is sharded."""
        by_name = any(isinstance(k, str) for k in saved["state"]) or any(
            isinstance(i, str) for g in saved["param_groups"] for i in g["params"])
        if not (by_name or self.fsdp):
            self.optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not by_name:
            names = [n for n, p in self.acc.unwrap_model(self.model).named_parameters() if p.requires_grad]
            saved = {"state": {names[i]: v for i, v in saved["state"].items()},
                     "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=saved,
                                 options=StateDictOptions(full_state_dict=True))

    def _check_resumable(self, found: Path) -> None:
        """A DeepSpeed checkpoint holds one optimizer partition per process: it resumes under
        DeepSpeed with the same ZeRO stage and number of processes, and nothing else resumes it
        (nor it anything else).  Checkpoints of one process, DDP and FSDP resume each other."""
        saved = json.loads((found / "state.json").read_text()).get("launch", {})
        was_ds = saved.get("distributed") == "DEEPSPEED"
        if not (was_ds or self.deepspeed):
            return
        now = self._launch()
        keys = ("distributed", "zero_stage", "processes")
        if [saved.get(k) for k in keys] != [now.get(k) for k in keys]:
            def show(d):
                return ", ".join(f"{k}={d.get(k)}" for k in keys if k in d) or "unknown"

            raise RuntimeError(
                f"checkpoint {found} was written with {show(saved)} and this run has {show(now)}: a DeepSpeed "
                "checkpoint resumes only under DeepSpeed with the same ZeRO stage and number of processes "
                "(its optimizer state is partitioned), and DeepSpeed resumes only its own checkpoints")

    def _maybe_resume(self) -> tuple[int, dict]:
        found = self.resume_from  # its weights were loaded before the model was prepared (not under DeepSpeed)
        if found is None:
            self._truncate_metrics(0)
            return 0, {}
        load_optimizer = self._load_optimizer_state
        if self.deepspeed:  # weights and optimizer partitions from the engine's own checkpoint
            self.model.load_checkpoint(str(found / "deepspeed"), tag="engine", load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
            load_optimizer = lambda saved: None  # noqa: E731 (the engine restored it)
        state = ckpt.load_trainer_state(found, self.optimizer, self.scheduler, load_optimizer=load_optimizer)
        self._truncate_metrics(state["step"])
        return state["step"], state.get("results", {})

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows after ``step``: the resumed run writes them again."""
        path = self.out / "metrics.jsonl"
        if not (self.acc.is_main_process and path.exists()):
            return
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        ckpt.atomic_write_text(path, "".join(r + "\n" for r in rows))

    def _finish(self, results: dict) -> dict:
        results.update(config=to_dict(self.cfg), data=self.data.report, steps=self.total_steps,
                       skipped_steps=getattr(self, "skipped_steps", 0), processes=self.acc.num_processes,
                       distributed=self._distributed_name(), compiled_layers=self.compiled_layers)
        state_dict = self._full_state_dict()
        if self.acc.is_main_process:
            final = self.out / "final"
            ckpt.atomic_save_model(final, self.acc.unwrap_model(self.model), self.tokenizer, state_dict)
            ckpt.atomic_write_json(self.out / "results.json", results)
        return results


# Methods that are not a loss over log-probs run their own loop: name -> "module:function(cfg)".
# Imported on use, so `import ulma.train` stays light and free of import cycles.
TRAINERS = {"reward": "ulma.rlhf.reward:train_reward", "rlhf": "ulma.rlhf.ppo:train_ppo"}


def train(cfg: Config) -> dict:
    entry = TRAINERS.get(cfg.method.name)
    if entry is None:
        return Trainer(cfg).run()
    import importlib

    module, function = entry.split(":")
    return getattr(importlib.import_module(module), function)(cfg)
