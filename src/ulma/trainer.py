"""The policy loop, for every method that is a loss over log-probs (on accelerate); its
frame (plan, rows, cadence, resume) is :class:`ulma.loop.Loop`.

One optimizer step = ``grad_accum`` micro-batches per process.  Positives and negatives
are counted over the whole step (all micro-batches, all processes) *before* the forward
passes, so the balanced reduction (:func:`ulma.losses.group_mean`) is the exact global
mean of means however the step is split.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from ulma import checkpoint as ckpt, tracking
from ulma.activations import keep_less
from ulma.atomic import atomic_torch_save, atomic_write_json
from ulma.backward_step import BackwardStep
from ulma.config import Config, ConfigError, to_dict, validate
from ulma.data.prepare import load_split, prepare
from ulma.data.tokenize import collate
from ulma.evaluation.metrics import evaluate, table_logps
from ulma.logprobs import attention_kernels, forward_logps, hidden_size, packs_prompts, reduce_logps, use_bf16
from ulma.loop import Loop, NonFiniteLossError, make_optimizer, my_share, set_seed, step_plan, total_steps
from ulma.losses import group_mean, weighted
from ulma.methods import DEFAULT_LOOP, LOOPS, METHODS, LossInputs, logp_reduction, loss_inputs
from ulma.memory import allocator_in_use, release as release_memory
from ulma.models import Reference, is_peft, load_policy, load_tokenizer, trainable_parameters


def make_accelerator(report_to: list[str] = (), output_dir: str | Path = "."):
    """The run's Accelerator; FSDP2 and DeepSpeed ZeRO also on the CPU (gloo).

    accelerate turns an FSDP config into FSDP only on GPU-like devices: with
    ``use_cpu: true`` it silently runs plain DDP instead.  FSDP2 (``fully_shard``) itself
    runs on the CPU over gloo, so a multi-process CPU run launched with an FSDP config is
    switched to accelerate's FSDP2 path here (for tests and debugging without a GPU).
    FSDP1 cannot compute on the CPU (its compute device is always a GPU): an error.
    DeepSpeed is only used by accelerate with ``cpu=False``; on the CPU it then needs the
    process counts fixed.  ``report_to``: experiment trackers (ulma.tracking), logging under ``output_dir``.
    """
    import os

    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wants_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    acc = Accelerator(cpu=not torch.cuda.is_available() and not wants_deepspeed,
                      **tracking.accelerator_kwargs(report_to, output_dir))
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


def _input_requires_grad(module, args, out: torch.Tensor) -> None:
    """Forward hook: the output needs a gradient wherever autograd records (see Trainer._compile)."""
    if torch.is_grad_enabled():
        out.requires_grad_(True)


class Trainer(Loop):
    """Holds the pieces of one run; :meth:`run` (:class:`ulma.loop.Loop`'s) is the loop."""

    def __init__(self, cfg: Config, *, model=None, tokenizer=None, examples: tuple | None = None):
        """``model``, ``tokenizer``, ``examples`` (train, held-out or None, skipped rows): objects
        already in memory (the Python API, :func:`ulma.api.train`) instead of the config's."""
        validate(cfg)
        self.cfg = cfg
        self.method = METHODS[cfg.method.name]
        self.method_state = self.method.state() if self.method.state else None  # e.g. BCO's running mean
        self.acc = make_accelerator(cfg.train.report_to, cfg.train.output_dir)
        self.out = Path(cfg.train.output_dir)
        ckpt.prepare_output(self.out, resume=cfg.train.resume, overwrite=cfg.train.overwrite,
                            delete=self.acc.is_main_process)
        self.acc.wait_for_everyone()
        self.resume_from = self.checkpoint_to_resume()
        tracking.init_accelerator_trackers(self.acc, cfg.train.report_to, self.out, to_dict(cfg), self.resume_from)
        set_seed(cfg.train.seed)
        self.tokenizer = tokenizer or load_tokenizer(cfg.model.name_or_path)
        self.data = prepare(cfg, self.tokenizer, self.method, load_split(cfg, examples))
        self.bf16 = use_bf16(cfg.train.bf16, self.acc.device)
        # train.bf16_frozen_weights: under bf16 autocast, LoRA's frozen base layers and a live
        # reference copy keep their Linear weights in bf16 (the same products, half their memory).
        # Not under FSDP or DeepSpeed, which keep their own flat parameter buffers of one dtype.
        frozen = self.bf16 and cfg.train.bf16_frozen_weights and not (self.fsdp or self.deepspeed)
        frozen = torch.bfloat16 if frozen else None
        self.model = load_policy(cfg.model, self.acc.device, frozen, model=model)
        keep_less(self.model, cfg.train, cfg.model.lora, self.acc.device.type)
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
        t = cfg.train
        packed = packs_prompts(self.model, t.fused_logps, t.share_prompts)
        self.plan = step_plan(self.data.train, self.total_steps * t.grad_accum, t.micro_batch_size,
                              self.acc.num_processes, t.seed, t.group_by_length, packed, hidden_size(self.model),
                              t.pad_to_multiple_of)

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
        world = self.acc.num_processes
        self.total_steps = total_steps(t, math.ceil(len(self.data.train) / (t.micro_batch_size * world)), t.grad_accum)
        # torch's fused AdamW: not under FSDP or DeepSpeed (sharded parameters; DeepSpeed steps its own way)
        self.optimizer, self.scheduler = make_optimizer(params, t, self.total_steps,
                                                        fused_ok=not (self.fsdp or self.deepspeed))
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

    # ------------------------------------------------------------------ one step
    def _inputs(self, batch: dict, ref: dict | None) -> LossInputs:
        m = self.cfg.method
        t = self.cfg.train
        out = forward_logps(self.model, batch, bf16=self.bf16, need_tokens=self.method.token_level,
                            fused=t.fused_logps, share_prompts=t.share_prompts, multiple=t.pad_to_multiple_of)
        policy = reduce_logps(out["sum"], out["count"], logp_reduction(self.method, m))
        ref_logps = None
        if self.method.needs_reference:
            ref_logps = self._reference_logps(batch, ref)
        dev = policy.device
        inp = loss_inputs(self.method, policy, ref_logps, batch["labels"].to(dev), batch["positive"].to(dev),
                          self.data.train.binary, out.get("tokens"), out.get("mask"), self.method_state)
        return self._kl_over_processes(inp)

    def _reference_logps(self, batch: dict, ref: dict | None) -> torch.Tensor:
        m = self.cfg.method
        if ref is not None:
            total, count = batch["ref_sum"], batch["ref_count"]
        else:
            with self.reference.model() as net:
                r = forward_logps(net, batch, bf16=self.bf16, fused=self.cfg.train.fused_logps,
                                  share_prompts=self.cfg.train.share_prompts,
                                  multiple=self.cfg.train.pad_to_multiple_of)
            total, count = r["sum"], r["count"]
        dev = self.acc.device
        return reduce_logps(total.to(dev), count.to(dev), logp_reduction(self.method, m))

    def train_step(self, step: int, ref: dict | None) -> dict:
        """One optimizer step over this process's share of the step's micro-batches."""
        t, m = self.cfg.train, self.cfg.method
        micro = self.plan[step * t.grad_accum : (step + 1) * t.grad_accum]
        units = self.data.train
        pos, neg = units.group_weights([i for mb in micro for i in mb])  # counts, each unit by its weight
        world = self.acc.num_processes
        sums = torch.zeros(3, dtype=torch.float64, device=self.acc.device)  # loss, pos and neg loss sums
        for k, mb in enumerate(micro):
            mine, share = self._my_share(mb)
            batch = collate(units, mine, self.pad_id, ref, t.pad_to_multiple_of)
            inp = self._inputs(batch, ref)
            losses, rewards = self.method.loss(inp, m)
            if self.method_state is not None:
                self.method_state.observe(rewards, share)
            losses = losses * share
            w = batch["weight"].to(losses.device)
            loss = group_mean(
                losses, inp.positive, n_pos=pos, n_neg=neg, pos_weight=m.pos_weight, neg_weight=m.neg_weight,
                balance=m.balance, weights=w,
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
            d = weighted(losses.detach(), w)
            sums += torch.stack([loss.detach(), d.where(inp.positive, 0.0).sum(), d.where(~inp.positive, 0.0).sum()])
        if self.method_state is not None:  # once per step, from every process's rewards
            self.method_state.commit(lambda t: self.acc.reduce(t, "sum") if world > 1 else t)
        loss_sum, pos_sum, neg_sum = sums.tolist()
        stats = {"loss": loss_sum, "pos_loss_sum": pos_sum, "neg_loss_sum": neg_sum, "n_pos": pos, "n_neg": neg}
        return self._apply_update(self._sum_over_processes(stats))

    def _kl_over_processes(self, inp: LossInputs) -> LossInputs:
        """KTO's reference point is a mean over the whole micro-batch, as TRL gathers it: each
        process's KL rows (a stand-in's too; only z0 reads them, without gradient) are
        gathered from every process (padded with NaN to one length, then dropped)."""
        if inp.kl_policy is None or self.acc.num_processes == 1:
            return inp
        from accelerate.utils import pad_across_processes

        mine = torch.stack([inp.kl_policy.detach(), inp.kl_ref]).float()  # [2, b]
        both = self.acc.gather(pad_across_processes(mine, dim=1, pad_index=float("nan")))  # [2 * world, b_max]
        both = both.view(-1, 2, both.shape[-1]).transpose(0, 1).reshape(2, -1)
        both = both[:, ~both[0].isnan()]
        inp.kl_policy, inp.kl_ref = both[0], both[1]
        return inp

    def _my_share(self, mb: list[int]) -> tuple[list[int], float]:
        return my_share(mb, self.acc.process_index, self.acc.num_processes)

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

    # ------------------------------------------------------------------ the loop (ulma.loop.Loop)
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def run(self) -> dict:
        self.ref_train, self.ref_eval = self._reference_caches()
        release_memory()  # the pass's freed batches: not resident through the steps (ulma.memory)
        return super().run()

    def one_step(self, step: int) -> dict:
        return self.train_step(step, self.ref_train)

    def start_trackers(self, step: int) -> list:
        return self.acc.trackers  # accelerate's, started in __init__ (empty but on the main process)

    def train_mode(self) -> None:
        self.model.train()

    def evaluate_before(self) -> dict:
        """The reference IS the initial policy: its log-probs are the "before" numbers."""
        return self._evaluate(self.ref_eval, 0, policy_logps=self.ref_eval)

    def evaluate(self, step: int) -> dict:
        metrics = self._evaluate(self.ref_eval, step)
        release_memory()
        return metrics

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
            atomic_torch_save({"train": train, "eval": evals}, path)
        return train, evals

    def _table_logps(self, net, table, desc: str) -> dict:
        """Log-probs of every row of ``table``, each process scoring every world-th row,
        then summed over processes: evaluation work is done once, not once per process."""
        rank, world = self.acc.process_index, self.acc.num_processes
        show = self.cfg.train.progress and self.acc.is_main_process
        size = self.cfg.train.forward_rows(self.acc.device.type)
        out = table_logps(net, table, self.pad_id, size, self.bf16, rows=list(range(rank, len(table), world)),
                          desc=desc, progress=show, min_batches=math.ceil(math.ceil(len(table) / world) / size),
                          fused=self.cfg.train.fused_logps, share_prompts=self.cfg.train.share_prompts,
                          multiple=self.cfg.train.pad_to_multiple_of)
        if world > 1:
            out = {k: self.acc.reduce(v.to(self.acc.device), "sum").cpu() for k, v in out.items()}
        return out

    def _evaluate(self, ref_eval: dict, step: int, policy_logps: dict | None = None) -> dict:
        if policy_logps is None:
            policy_logps = self._table_logps(self._eval_model(), self.data.eval.table, "evaluate")
        metrics = evaluate(self.model, self.data.eval, ref_eval, self.method, self.cfg, self.pad_id, self.bf16,
                           policy_logps=policy_logps, state=self.method_state)
        self._log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        return metrics

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

    def save(self, step: int, results: dict) -> None:
        bad = self._nonfinite_weights()
        if bad:  # never write a NaN checkpoint: the last good one stays the newest
            raise NonFiniteLossError(f"step {step}: non-finite weights in {bad[:3]}; checkpoint not written")
        state_dict = self._full_state_dict()
        optimizer_state = self._full_optimizer_state()
        tmp = self._save_engine(step) if self.deepspeed else None
        if self.acc.is_main_process:
            state = {"step": step, "results": results, "launch": self._launch()}
            if self.method_state is not None:  # resumed exactly (state.json keeps floats exactly)
                state["method_state"] = self.method_state.state_dict()
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

    def load(self, found: Path) -> dict:
        """The optimizer, schedule and RNG of checkpoint ``found``; its weights were loaded
        before the model was prepared (not under DeepSpeed, whose engine loads both)."""
        load_optimizer = self._load_optimizer_state
        if self.deepspeed:
            self.model.load_checkpoint(str(found / "deepspeed"), tag="engine", load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
            load_optimizer = lambda saved: None  # noqa: E731 (the engine restored it)
        state = ckpt.load_trainer_state(found, self.optimizer, self.scheduler, load_optimizer=load_optimizer)
        if self.method_state is not None:
            self.method_state.load_state_dict(state["method_state"])
        return state

    def finish(self, results: dict) -> dict:
        results.update(config=to_dict(self.cfg), data=self.data.report, steps=self.total_steps,
                       skipped_steps=self.skipped_steps, processes=self.acc.num_processes,
                       distributed=self._distributed_name(), compiled_layers=self.compiled_layers,
                       allocator=allocator_in_use())
        state_dict = self._full_state_dict()
        if self.acc.is_main_process:
            final = self.out / "final"
            ckpt.atomic_save_model(final, self.acc.unwrap_model(self.model), self.tokenizer, state_dict)
            atomic_write_json(self.out / "results.json", results)
        return results


def train_policy(cfg: Config) -> dict:
    return Trainer(cfg).run()


def train(cfg: Config) -> dict:
    """Run ``cfg``'s method in the loop the method registry names for it; then, with
    ``train.push_to_hub``, push the final model (ulma.export)."""
    import importlib

    module, function = LOOPS.get(cfg.method.name, DEFAULT_LOOP).split(":")
    results = getattr(importlib.import_module(module), function)(cfg)
    if cfg.train.push_to_hub:  # the final model and a model card, from the main process
        from ulma.export import push_after_training

        push_after_training(cfg)
    return results
