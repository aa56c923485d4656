"""One benchmark workload per process: ``python workloads.py NAME --data DIR --out FILE``.

Each workload runs in its own process so that its peak resident memory (ru_maxrss) is
its own, and writes one JSON object: per-step seconds, tokens per step, peak RSS.
Runs in the benchmark's environment (benchmarks/.venv), which has TRL; ulma never
imports TRL.

Token counts are non-padding tokens of the sequences a step trains on (prompt +
response, both tools count their own batches' attention masks); TRL KTO's extra
KL-estimate sequences are work TRL chooses to do and are not counted as throughput, nor
are ulma KTO's (its mismatched KL rows, scored beside each unit: the same work as TRL's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

MAX_LENGTH = 256
MICRO = 8
LR = 1e-5
BETA = 0.1
# run.py decides the precision once for both tools: bf16 where its matrix products are fast.
BF16 = os.environ.get("BENCH_BF16", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The model every workload loads: ulma's offline default, or a folder (run.py --model).
MODEL = os.environ.get("BENCH_MODEL", "smollm2-135m-instruct")


def sync() -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb() -> dict:
    """Peak resident memory of this process (Linux reports KiB), and peak GPU memory on a GPU."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if DEVICE.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def model_path() -> str:
    from ulma.models import resolve_model_path

    return resolve_model_path(MODEL)


def param_counts(model) -> dict:
    """{"params": all parameters, "trainable": those with gradients} (MFU uses the first)."""
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


# ---------------------------------------------------------------------- ulma


def ulma_config(method: str, lora: bool, data: Path, steps: int, out: Path, **overrides):
    from ulma.config import Config, from_dict

    pairs = method == "dpo"
    return from_dict(Config, {
        "model": {"name_or_path": MODEL, "lora": {"enabled": lora}},
        "data": {"train": {"source": "jsonl", "path": str(data / ("pairs.jsonl" if pairs else "unpaired.jsonl"))},
                 "eval_fraction": 0.05, "eval_limit": 8, "max_length": MAX_LENGTH},
        "method": {"name": method, "beta": BETA, **overrides.pop("method_options", {})},
        "train": {"output_dir": str(out), "overwrite": True, "max_steps": steps, "micro_batch_size": MICRO,
                  "grad_accum": 1, "lr": LR, "warmup_ratio": 0.0, "eval_every": 0, "save_every": 0,
                  "progress": False, "bf16": BF16, **overrides.pop("train", {})},
        **overrides,
    })


def run_ulma(method: str, lora: bool, data: Path, steps: int, work: Path, **overrides) -> dict:
    """ulma's own Trainer: reference log-probs precomputed once, then timed optimizer steps.

    ``overrides`` switch a speed lever off, e.g. train={"group_by_length": False}; ``method_options``
    are method settings beside its name and beta."""
    from ulma.trainer import Trainer

    trainer = Trainer(ulma_config(method, lora, data, steps, work, **overrides))
    t0 = time.perf_counter()
    ref_train, _ = trainer._reference_caches()
    precompute = time.perf_counter() - t0
    units = trainer.data.train
    trainer.model.train()
    setup_peak = {}
    if DEVICE.type == "cuda":  # the steps' own peak, beside the whole process's (loading included)
        setup_peak = {"setup_peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
        torch.cuda.reset_peak_memory_stats()
    seconds, tokens = [], []
    for step in range(steps):
        micro = trainer.plan[step]  # grad_accum = 1: one micro-batch per step
        sync()
        t0 = time.perf_counter()
        trainer.train_step(step, ref_train)
        sync()
        seconds.append(time.perf_counter() - t0)
        tokens.append(sum(len(units.table.sequences[r].input_ids) for i in micro for r in units.rows[i]))
    steps_peak = {"steps_peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if DEVICE.type == "cuda" else {}
    if units.kl_rows:  # KTO: the precomputed reference also scored the KL rows (run.py's one-epoch rate)
        unit_tokens = sum(len(units.table.sequences[r].input_ids) for rows in units.rows for r in rows)
        steps_peak["reference_token_ratio"] = sum(units.table.lengths()) / unit_tokens
    return {"seconds": seconds, "tokens": tokens, "setup_seconds": {"reference_precompute": precompute},
            "precomputed_reference": ref_train is not None, **setup_peak, **steps_peak, **param_counts(trainer.model)}


def run_ulma_whole(method: str, lora: bool, data: Path, steps: int, work: Path, train: dict | None = None) -> dict:
    """A whole run as ``ulma train`` makes it, for memory over a run's length: the CLI's
    allocator settings (:func:`ulma.memory.configure`), the reference pass over the training
    and held-out rows, evaluation before and after, the final save.  A fifth of the rows is
    held out (as in the method configs), so ``data`` needs ``steps * 8 / 0.8`` rows for one
    epoch.  Per-step seconds from the run's metrics.jsonl.  ``train``: settings changed from
    the benchmark's (a lever switched off)."""
    from ulma.memory import configure
    from ulma.trainer import Trainer

    configure()
    cfg = ulma_config(method, lora, data, steps, work, train={"lr": 3e-4, **(train or {})})
    cfg.data.eval_fraction, cfg.data.eval_limit = 0.2, None
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    trainer.run()
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    seconds = [r["seconds"] for r in rows if "seconds" in r]
    units = trainer.data.train
    tokens = [sum(len(units.table.sequences[r].input_ids) for i in trainer.plan[k] for r in units.rows[i])
              for k in range(len(seconds))]
    return {"seconds": seconds, "tokens": tokens, "run_seconds": time.perf_counter() - t0,
            "precomputed_reference": False, **param_counts(trainer.model)}


# ---------------------------------------------------------------------- TRL


def run_trl(kind: str, lora: bool, data: Path, steps: int, work: Path, precompute: bool, **args) -> dict:
    """TRL's KTOTrainer / DPOTrainer on the same rows, batch, length and precision, otherwise
    as shipped: TRL 1.13 turns gradient checkpointing on by default (recorded in the result).
    ``args``: other training arguments (e.g. max_grad_norm=0: no clipping)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    path = model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = load_dataset("json", data_files=str(data / ("pairs.jsonl" if kind == "dpo" else "unpaired.jsonl")),
                      split="train")
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    common = dict(output_dir=str(work), per_device_train_batch_size=MICRO, gradient_accumulation_steps=1,
                  learning_rate=LR, max_steps=steps, lr_scheduler_type="constant", logging_steps=10_000,
                  save_strategy="no", report_to=[], bf16=BF16, use_cpu=DEVICE.type == "cpu", max_length=MAX_LENGTH,
                  beta=BETA, precompute_ref_log_probs=precompute, dataloader_num_workers=0, seed=0,
                  disable_tqdm=True)
    common.update(args)
    if kind == "dpo":
        from trl import DPOConfig as Cfg, DPOTrainer as Base
    else:
        from trl import KTOConfig as Cfg, KTOTrainer as Base

    seconds, tokens, pending = [], [], {}

    class Timed(Base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            pending["tokens"] = int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            pending["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            seconds.append(time.perf_counter() - pending["t0"])
            tokens.append(pending["tokens"])

    trainer = Timed(model=model, args=Cfg(**common), train_dataset=ds, processing_class=tok,
                    peft_config=peft_config, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    return {"seconds": seconds, "tokens": tokens, "train_call_seconds": time.perf_counter() - t0,
            "gradient_checkpointing": trainer.args.gradient_checkpointing,  # TRL's default: on
            "precomputed_reference": precompute, **param_counts(trainer.model)}


# ---------------------------------------------------------------------- forward-only


def _forward_rows(data: Path, n: int):
    from ulma.data.sources import load_source
    from ulma.data.tokenize import SequenceTable, Tokenizer
    from ulma.models import load_tokenizer

    tokenizer = load_tokenizer(model_path())
    tok = Tokenizer(tokenizer, max_length=MAX_LENGTH)
    table = SequenceTable()
    for e in load_source("jsonl", str(data / "unpaired.jsonl")).examples[:n]:
        tok.add(table, e.prompt, e.response, e.origin)
    return tokenizer, table


def run_forward(impl: str, data: Path, n: int, batch: int | None = None, compile: bool = False) -> dict:
    """Reference log-probs of n rows: ulma's table_logps vs a plain loop.

    ulma runs as its Trainer does: batches of ``train.forward_rows(device)`` rows (by default
    4x the micro-batch on CUDA, the micro-batch elsewhere), or ``batch``.  The plain loop is
    what one writes first: rows in file order in batches of ``batch`` (default the
    micro-batch, 8), ``model(**batch)`` over every position, a float32 log-softmax over the
    vocabulary, gather; no_grad in both.
    On a GPU the pass runs four times and the last three are timed (the first loads kernels,
    and compiles them with ``compile``)."""
    from transformers import AutoModelForCausalLM

    from ulma.config import TrainConfig
    from ulma.data.tokenize import pad_rows
    from ulma.evaluation.metrics import table_logps
    from ulma.models import compile_layers

    tokenizer, table = _forward_rows(data, n)
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32).to(DEVICE).eval()
    if compile:
        compile_layers(model)
    tokens = sum(len(s.input_ids) for s in table.sequences)

    def ulma_pass():
        size = batch or TrainConfig(micro_batch_size=MICRO).forward_rows(DEVICE.type)
        return table_logps(model, table, tokenizer.pad_token_id, size, bf16=BF16, progress=False,
                           share_prompts=impl != "ulma-unshared")["sum"]

    def plain_pass():
        sums, size = [], batch or MICRO
        cast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=BF16)
        with torch.no_grad(), cast:
            for s in range(0, len(table), size):
                b = {k: v.to(DEVICE) for k, v in pad_rows(table, list(range(s, min(s + size, len(table)))),
                                                          tokenizer.pad_token_id).items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
                picked = logp.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
                sums.append((picked * b["loss_mask"][:, 1:]).sum(-1))
        return torch.cat(sums)

    one_pass = ulma_pass if impl.startswith("ulma") else plain_pass
    times = []
    for _ in range(4 if DEVICE.type == "cuda" else 1):  # a pass of 256 rows takes ~0.5 s on a GPU: 3 timed
        sync()
        t0 = time.perf_counter()
        out = one_pass()
        sync()
        times.append(time.perf_counter() - t0)
    times = times[1:] or times
    return {"seconds": times, "tokens": [tokens] * len(times), "checksum": float(out.double().sum())}


# ---------------------------------------------------------------------- generation


def run_generate(impl: str, data: Path, n: int, new_tokens: int) -> dict:
    """Greedy answers to n prompts: ulma's batched generator vs model.generate per prompt."""
    from transformers import AutoModelForCausalLM

    from ulma.data.sources import load_source
    from ulma.evaluation.generate import GenerateConfig, generate_batch, prompt_tokens
    from ulma.models import load_tokenizer

    tokenizer = load_tokenizer(model_path())
    dtype = torch.bfloat16 if BF16 else torch.float32  # generation: weights in the compute precision
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=dtype).to(DEVICE).eval()
    prompts = [e.prompt for e in load_source("jsonl", str(data / "unpaired.jsonl")).examples[: 2 * n : 2]]
    ids = prompt_tokens(tokenizer, prompts, MAX_LENGTH - new_tokens)
    cfg = GenerateConfig(max_new_tokens=new_tokens, do_sample=False)
    t0 = time.perf_counter()
    made = 0
    if impl == "ulma":
        for s in range(0, len(ids), MICRO):
            made += sum(len(r["tokens"]) for r in generate_batch(model, tokenizer, ids[s : s + MICRO], cfg))
    else:
        with torch.no_grad():
            for p in ids:
                out = model.generate(input_ids=torch.tensor([p], device=DEVICE), max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                made += out.shape[1] - len(p)
    sync()
    return {"seconds": [time.perf_counter() - t0], "tokens": [made]}


# ---------------------------------------------------------------------- the matmul peak


def run_matmul_peak(size: int = 2048, repeats: int = 10) -> dict:
    """Best-of-``repeats`` throughput of a square matrix product, fp32 and bf16 (FLOP/s).

    On a GPU the products are 8192 wide: a 2048 one is too small to fill an H100."""
    size = 8192 if DEVICE.type == "cuda" else size
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # Emulated bf16 (CPUs without AMX/AVX512-BF16) is ~250x slower: a 2048 product takes
        # minutes there, so measure a smaller one (its rate is what MFU is relative to).
        n = size if dtype == torch.float32 or BF16 else size // 4
        a, b = (torch.randn(n, n, dtype=dtype, device=DEVICE) for _ in range(2))
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best
    return {"flops": out, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------- main

KTO_AS_TRL = {"balance": False, "logp_reduction": "sum"}

WORKLOADS = {
    "ulma-ulma-lora": lambda a: run_ulma("ulma", True, a.data, a.steps, a.work),
    "ulma-ulma-full": lambda a: run_ulma("ulma", False, a.data, a.steps, a.work),
    # levers switched off, one at a time
    "ulma-ulma-lora-ungrouped": lambda a: run_ulma("ulma", True, a.data, a.steps, a.work,
                                                   train={"group_by_length": False}),
    "ulma-ulma-lora-checkpointed": lambda a: run_ulma("ulma", True, a.data, a.steps, a.work,
                                                      train={"gradient_checkpointing": True}),
    "ulma-ulma-lora-exact-widths": lambda a: run_ulma("ulma", True, a.data, a.steps, a.work,
                                                      train={"pad_to_multiple_of": 1}),
    "ulma-ulma-full-checkpointed": lambda a: run_ulma("ulma", False, a.data, a.steps, a.work,
                                                      train={"gradient_checkpointing": True}),
    "ulma-ulma-full-checkpointed-compiled": lambda a: run_ulma(
        "ulma", False, a.data, a.steps, a.work, train={"gradient_checkpointing": True, "compile": True}),
    # AdamW applied in the backward (train.optimizer_in_backward, off by default: a memory lever,
    # without clipping), checkpointed, against TRL checkpointed (its default) and unclipped too
    "ulma-ulma-full-checkpointed-inbwd": lambda a: run_ulma(
        "ulma", False, a.data, a.steps, a.work,
        train={"gradient_checkpointing": True, "optimizer_in_backward": True, "max_grad_norm": 0}),
    "ulma-ulma-lora-checkpointed-fp32-frozen": lambda a: run_ulma(
        "ulma", True, a.data, a.steps, a.work, train={"gradient_checkpointing": True, "bf16_frozen_weights": False}),
    "ulma-ulma-lora-not-lean": lambda a: run_ulma("ulma", True, a.data, a.steps, a.work,
                                                  train={"lean_activations": False}),
    # LoRA branches recomputed in the backward (train.recompute_lora; auto: on a GPU, off on a CPU with dropout)
    "ulma-ulma-lora-peft-lora": lambda a: run_ulma("ulma", True, a.data, a.steps, a.work,
                                                   train={"recompute_lora": False}),
    "ulma-ulma-lora-recompute-lora": lambda a: run_ulma("ulma", True, a.data, a.steps, a.work,
                                                        train={"recompute_lora": True}),
    "ulma-ulma-lora-unfused": lambda a: run_ulma("ulma", True, a.data, a.steps, a.work, train={"fused_logps": False}),
    "ulma-ulma-full-unfused": lambda a: run_ulma("ulma", False, a.data, a.steps, a.work,
                                                 train={"fused_logps": False}),
    "ulma-ulma-full-foreach-adamw": lambda a: run_ulma("ulma", False, a.data, a.steps, a.work,
                                                      train={"fused_optimizer": False}),
    "ulma-ulma-lora-live-reference": lambda a: run_ulma("ulma", True, a.data, a.steps, a.work,
                                                        model={"name_or_path": MODEL,
                                                               "lora": {"enabled": True}, "reference": "live"}),
    # torch.compile of each decoder layer (train.compile, off by default): a lever switched on
    "ulma-ulma-lora-compiled": lambda a: run_ulma("ulma", True, a.data, a.steps, a.work, train={"compile": True}),
    "ulma-ulma-full-compiled": lambda a: run_ulma("ulma", False, a.data, a.steps, a.work, train={"compile": True}),
    "ulma-dpo-full-compiled": lambda a: run_ulma("dpo", False, a.data, a.steps, a.work, train={"compile": True}),
    # model-FLOPs utilisation at a batch that fills a GPU (8 rows of ~150 tokens do not)
    "ulma-ulma-full-mb64": lambda a: run_ulma("ulma", False, a.data, a.steps, a.work, train={"micro_batch_size": 64}),
    "ulma-ulma-full-mb64-compiled": lambda a: run_ulma("ulma", False, a.data, a.steps, a.work,
                                                       train={"micro_batch_size": 64, "compile": True}),
    "ulma-dpo-lora": lambda a: run_ulma("dpo", True, a.data, a.steps, a.work),
    # KTO in ulma, set as TRL's KTOTrainer computes it: one mean over all samples (balance off),
    # log-probs summed, z0 from one mismatched row per sample (configs/kto.yaml)
    "ulma-kto-lora": lambda a: run_ulma("kto", True, a.data, a.steps, a.work, method_options=KTO_AS_TRL),
    "ulma-kto-full": lambda a: run_ulma("kto", False, a.data, a.steps, a.work, method_options=KTO_AS_TRL),
    "ulma-dpo-full": lambda a: run_ulma("dpo", False, a.data, a.steps, a.work),
    "ulma-dpo-full-checkpointed": lambda a: run_ulma("dpo", False, a.data, a.steps, a.work,
                                                     train={"gradient_checkpointing": True}),
    "ulma-dpo-lora-unshared": lambda a: run_ulma("dpo", True, a.data, a.steps, a.work, train={"share_prompts": False}),
    "trl-kto-lora": lambda a: run_trl("kto", True, a.data, a.steps, a.work, precompute=False),
    # a run's whole length (run.py --long-steps, on rows enough for it): memory of real runs
    "ulma-ulma-lora-long": lambda a: run_ulma_whole("ulma", True, a.data, a.steps, a.work),
    # the same run's first 8 steps (reference pass and evaluations included): the run's own start
    "ulma-ulma-lora-long-8": lambda a: run_ulma_whole("ulma", True, a.data, 8, a.work),
    "ulma-ulma-lora-long-exact-widths": lambda a: run_ulma_whole("ulma", True, a.data, a.steps, a.work,
                                                                 train={"pad_to_multiple_of": 1}),
    "ulma-ulma-lora-long-recompute-lora": lambda a: run_ulma_whole("ulma", True, a.data, a.steps, a.work,
                                                                   train={"recompute_lora": True}),
    "trl-kto-lora-long": lambda a: run_trl("kto", True, a.data, a.steps, a.work, precompute=False, learning_rate=3e-4),
    "trl-kto-full": lambda a: run_trl("kto", False, a.data, a.steps, a.work, precompute=False),
    "trl-kto-full-unclipped": lambda a: run_trl("kto", False, a.data, a.steps, a.work, precompute=False,
                                                max_grad_norm=0.0),
    "trl-dpo-lora": lambda a: run_trl("dpo", True, a.data, a.steps, a.work, precompute=False),
    "trl-dpo-full": lambda a: run_trl("dpo", False, a.data, a.steps, a.work, precompute=True),
    "forward-ulma": lambda a: run_forward("ulma", a.data, a.rows),
    "forward-plain": lambda a: run_forward("plain", a.data, a.rows),
    "forward-ulma-unshared": lambda a: run_forward("ulma-unshared", a.data, a.rows),
    "forward-ulma-mb32": lambda a: run_forward("ulma", a.data, a.rows, batch=4 * MICRO),
    "forward-ulma-compiled": lambda a: run_forward("ulma", a.data, a.rows, compile=True),
    "forward-ulma-mb8": lambda a: run_forward("ulma", a.data, a.rows, batch=MICRO),
    "forward-ulma-mb64": lambda a: run_forward("ulma", a.data, a.rows, batch=8 * MICRO),
    "forward-plain-mb64": lambda a: run_forward("plain", a.data, a.rows, batch=8 * MICRO),
    "forward-plain-mb32": lambda a: run_forward("plain", a.data, a.rows, batch=4 * MICRO),
    "generate-ulma": lambda a: run_generate("ulma", a.data, a.prompts, a.new_tokens),
    "generate-plain": lambda a: run_generate("plain", a.data, a.prompts, a.new_tokens),
    "matmul-peak": lambda a: run_matmul_peak(),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # NAME-glibc: the workload NAME, which run.py starts without the allocator ulma train preloads
    p.add_argument("name", choices=sorted([*WORKLOADS, *(f"{n}-glibc" for n in WORKLOADS if n.startswith("ulma-"))]))
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompts", type=int, default=32, help="prompts for generation")
    p.add_argument("--new-tokens", type=int, default=64)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    result = WORKLOADS[a.name.removesuffix("-glibc")](a)
    memory = peak_memory_mb()
    if "setup_peak_gpu_mb" in result:  # the peak counter was reset after the setup
        memory["peak_gpu_mb"] = max(memory["peak_gpu_mb"], result["setup_peak_gpu_mb"])
    from ulma.memory import allocator_in_use

    result.update(name=a.name, pid=os.getpid(), allocator=allocator_in_use(), **memory)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
