"""ulma vs TRL, side by side, alternating, in one run: ``make bench``.

Runs each workload of workloads.py in its own process (so peak memory is its own),
ulma and TRL alternating within each pair and the order flipping every round, so a
slow spell of a shared machine hits both. Prints one table and writes it, with the
machine's description, to benchmarks/results/<time>.json and results/latest.{json,md}.

Same model (SmolLM2-135M-Instruct, offline, unless --model names a folder), same rows
(Anthropic HH harmless pairs whose prompt + reply fit in 256 tokens), micro-batch 8,
max length 256, fp32 unless bf16 matrix products are fast here (they are emulated on
CPUs without AMX/AVX512-BF16). On a GPU, memory is the peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MICRO = 8
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.part.jsonl.gz"

# (ulma workload, baseline workload, what is compared)
PAIRS = [
    ("ulma-ulma-lora", "trl-kto-lora", "ULMA vs TRL KTOTrainer, LoRA r=8"),
    ("ulma-ulma-full", "trl-kto-full", "ULMA vs TRL KTOTrainer, full fine-tuning"),
    ("ulma-kto-lora", "trl-kto-lora", "KTO vs TRL KTOTrainer (the same loss), LoRA r=8"),
    ("ulma-kto-full", "trl-kto-full", "KTO vs TRL KTOTrainer (the same loss), full fine-tuning"),
    ("ulma-dpo-lora", "trl-dpo-lora", "DPO vs TRL DPOTrainer, LoRA r=8"),
    ("ulma-dpo-full", "trl-dpo-full", "DPO vs TRL DPOTrainer (precomputed reference), full"),
    # TRL 1.13's KTOConfig/DPOConfig turn gradient checkpointing on by default (ulma: off):
    # the same setting on both sides, for memory and speed like for like.
    ("ulma-ulma-lora-checkpointed", "trl-kto-lora", "ULMA vs TRL KTOTrainer, LoRA r=8, both with gradient checkpointing"),
    ("ulma-ulma-full-checkpointed", "trl-kto-full", "ULMA vs TRL KTOTrainer, full fine-tuning, both with gradient checkpointing"),
    ("ulma-ulma-full-checkpointed-compiled", "trl-kto-full",
     "ULMA vs TRL KTOTrainer, full, both checkpointed; ulma's decoder layers compiled (train.compile)"),
    ("ulma-ulma-full-checkpointed-inbwd", "trl-kto-full-unclipped",
     "ULMA vs TRL KTOTrainer, full, both checkpointed and unclipped; ulma's AdamW applied in the backward"),
    ("ulma-dpo-full-checkpointed", "trl-dpo-full",
     "DPO vs TRL DPOTrainer (precomputed reference), full, both with gradient checkpointing"),
    ("forward-ulma", "forward-plain", "reference log-probs (ulma's default batch: 32 rows on CUDA, else 8) "
                                      "vs plain model(**batch) + fp32 log_softmax, 8 rows"),
    ("forward-ulma-mb32", "forward-plain-mb32", "reference log-probs vs the plain loop, both in batches of 32 rows"),
    ("forward-ulma-mb64", "forward-plain-mb64", "reference log-probs vs the plain loop, both in batches of 64 rows"),
    ("generate-ulma", "generate-plain", "greedy generation, batched vs model.generate per prompt"),
    # memory over a run's length (once, in the first round: TRL takes ~10 s a step here)
    ("ulma-ulma-lora-long", "trl-kto-lora-long", "ULMA vs TRL KTOTrainer, LoRA r=8, lr 3e-4, a long run "
                                                 "(--long-steps; ulma: the whole `ulma train` run)"),
]

# (ulma as shipped, ulma with one speed lever off, the lever)
LEVERS = [
    ("ulma-ulma-lora", "ulma-ulma-lora-ungrouped", "batches grouped by length"),
    ("ulma-ulma-lora", "ulma-ulma-lora-live-reference", "reference log-probs precomputed (vs a reference forward per step)"),
    ("ulma-ulma-lora", "ulma-ulma-lora-checkpointed", "no gradient checkpointing (off by default: a memory lever)"),
    ("ulma-ulma-lora", "ulma-ulma-lora-exact-widths", "widths rounded up to a multiple of 64 (vs exact: a new "
                                                      "shape almost every step; a memory lever)"),
    ("ulma-ulma-lora-long", "ulma-ulma-lora-long-exact-widths", "widths rounded up to a multiple of 64, "
                                                                "a long run (a memory lever)"),
    ("ulma-ulma-lora", "ulma-ulma-lora-glibc", "jemalloc or tcmalloc preloaded where installed, as `ulma train` "
                                               "runs (vs glibc's malloc; host memory)"),
    ("ulma-ulma-lora-long", "ulma-ulma-lora-long-glibc", "jemalloc or tcmalloc where installed (vs glibc's "
                                                         "malloc), a long run (host memory)"),
    ("ulma-ulma-lora-long", "ulma-ulma-lora-long-8", "a run's length: --long-steps vs the same run's first 8 steps "
                                                     "(host memory over a run)"),
    ("ulma-ulma-lora-long-glibc", "ulma-ulma-lora-long-8-glibc", "a run's length under glibc's malloc"),
    ("ulma-ulma-lora", "ulma-ulma-lora-not-lean", "lean activations: silu(gate) recomputed in the backward, "
                                                  "bool dropout masks on a CPU (LoRA; memory)"),
    ("ulma-ulma-lora", "ulma-ulma-lora-peft-lora", "LoRA branches recomputed in the backward (train.recompute_lora "
                                                   "auto: on a GPU; off on a CPU with dropout, so equal there; memory)"),
    # train.recompute_lora is off on a CPU with LoRA dropout: here "on" is the run with it
    ("ulma-ulma-lora-recompute-lora", "ulma-ulma-lora", "LoRA branches recomputed on a CPU (train.recompute_lora=true)"),
    ("ulma-ulma-lora-long-recompute-lora", "ulma-ulma-lora-long", "LoRA branches recomputed on a CPU, a long run"),
    ("ulma-ulma-lora", "ulma-ulma-lora-unfused", "fused output layer: logits only at response tokens, chunked (LoRA)"),
    ("ulma-ulma-full", "ulma-ulma-full-unfused", "fused output layer (full fine-tuning)"),
    ("ulma-ulma-full", "ulma-ulma-full-foreach-adamw", "fused AdamW (vs the per-tensor loop), full fine-tuning"),
    ("ulma-ulma-lora-checkpointed", "ulma-ulma-lora-checkpointed-fp32-frozen",
     "frozen base weights stored in bf16 under bf16 autocast (LoRA, checkpointed; memory)"),
    ("ulma-dpo-lora", "ulma-dpo-lora-unshared", "shared prompts: a pair's prompt run once (DPO, LoRA)"),
    ("forward-ulma", "forward-ulma-unshared", "shared prompts: rows of one prompt run it once (forward-only)"),
    ("forward-ulma", "forward-ulma-mb8", "forward-only batches of train.forward_rows() (4x the micro-batch on CUDA, "
                                         "the micro-batch elsewhere) vs the micro-batch (8)"),
    ("forward-ulma-compiled", "forward-ulma", "torch.compile of each decoder layer (forward-only)"),
    # train.compile is off by default: here "on" is the run with it
    ("ulma-ulma-lora-compiled", "ulma-ulma-lora", "torch.compile of each decoder layer (LoRA)"),
    ("ulma-ulma-full-compiled", "ulma-ulma-full", "torch.compile of each decoder layer (full fine-tuning)"),
    ("ulma-ulma-full-checkpointed-compiled", "ulma-ulma-full-checkpointed",
     "torch.compile of each decoder layer (full fine-tuning, checkpointed)"),
    ("ulma-dpo-full-compiled", "ulma-dpo-full", "torch.compile of each decoder layer (DPO, full fine-tuning)"),
    ("ulma-ulma-full-mb64-compiled", "ulma-ulma-full-mb64", "torch.compile of each decoder layer (full, 64 rows a step)"),
    ("forward-ulma", "forward-plain", "forward-only: length-sorted batches, output layer only at response tokens, "
                                      "chunked float32 logsumexp (vs plain loop)"),
]


def write_data(out: Path, n_pairs: int, max_tokens: int, model: str = "smollm2-135m-instruct") -> dict:
    """The same rows for every tool: TRL's conversational formats, which ulma reads as they are."""
    from transformers import AutoTokenizer

    from ulma.data.sources import load_source
    from ulma.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model))
    loaded = load_source("hh", str(HH), on_error="skip")

    def fits(prompt, reply) -> bool:
        msgs = list(prompt) + [{"role": "assistant", "content": reply}]
        # Counted from the text: transformers 5's apply_chat_template(tokenize=True) returns a
        # BatchEncoding, whose len() is its number of fields (2), so every pair would "fit".
        text = tok.apply_chat_template(msgs, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"]) <= max_tokens

    pairs = [e for e in loaded.examples if fits(e.prompt, e.chosen) and fits(e.prompt, e.rejected)][:n_pairs]
    with open(out / "pairs.jsonl", "w") as f, open(out / "unpaired.jsonl", "w") as g:
        for e in pairs:
            prompt = [dict(t) for t in e.prompt]
            chosen = [{"role": "assistant", "content": e.chosen}]
            rejected = [{"role": "assistant", "content": e.rejected}]
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
            g.write(json.dumps({"prompt": prompt, "completion": chosen, "label": True}) + "\n")
            g.write(json.dumps({"prompt": prompt, "completion": rejected, "label": False}) + "\n")
    return {"source": str(HH), "pairs": len(pairs), "unpaired_rows": 2 * len(pairs), "max_tokens": max_tokens}


def machine() -> dict:
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "versions": _versions(),
            # settings every workload process inherits that change memory or speed (glibc's allocator, threads)
            "environment": {k: v for k, v in os.environ.items()
                            if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "OMP_", "MKL_", "ULMA_MALLOC"))}}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("transformers", "peft", "accelerate", "trl", "ulma"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def precision(setting: str) -> str:
    import torch

    from ulma.logprobs import bf16_is_fast

    if setting != "auto":
        return setting
    return "bf16" if bf16_is_fast(torch.device("cuda" if torch.cuda.is_available() else "cpu")) else "fp32"


def is_long(name: str) -> bool:
    """A workload of a run's whole length (--long-steps, on rows of its own)."""
    return "-long" in name


def run_one(name: str, data: Path, work: Path, steps: int, args) -> dict | None:
    """One workload in its own process; None when it failed and --keep-going is set."""
    out = work / f"{name}.json"
    cmd = [sys.executable, str(HERE / "workloads.py"), name, "--data", str(data), "--work", str(work / name),
           "--out", str(out), "--steps", str(steps), "--rows", str(args.rows), "--prompts", str(args.prompts),
           "--new-tokens", str(args.new_tokens)]
    print(f"  {name} ...", end="", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=workload_env(name))
        failure = f"exit {proc.returncode}" if proc.returncode != 0 else None
        log = proc.stdout[-3000:] + proc.stderr[-6000:]
    except subprocess.TimeoutExpired as e:
        failure, log = f"over --timeout {args.timeout} s", str(e.stderr or "")[-6000:]
    if failure:
        sys.stdout.write("\n" + log + "\n")
        if not args.keep_going:
            raise SystemExit(f"workload {name} failed ({failure})")
        print(f"  {name} FAILED ({failure}); going on", flush=True)
        return None
    result = json.loads(out.read_text())
    gpu = f", peak GPU {result['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in result else ""
    print(f" {sum(result.get('seconds', [0])):.1f} s measured, peak RSS {result['peak_rss_mb']:.0f} MB{gpu}", flush=True)
    return result


def workload_env(name: str) -> dict:
    """ulma's workloads run under the allocator `ulma train` preloads (jemalloc or tcmalloc where
    installed; ULMA_MALLOC=glibc for glibc's), as its users get them; TRL's and the "-glibc"
    levers under the system's malloc."""
    from ulma.memory import allocator_library, preload_env

    lib = allocator_library() if name.startswith("ulma-") and not name.endswith("-glibc") else None
    return preload_env(lib) if lib else dict(os.environ)


def memory_mb(result: dict) -> float:
    """The memory compared: peak GPU memory on a GPU, else peak resident memory."""
    return result.get("peak_gpu_mb", result["peak_rss_mb"])


def memory_label(results: dict) -> str:
    return "peak GPU MB" if any("peak_gpu_mb" in r for r in results.values()) else "peak RSS MB"


def collect(runs: list[dict], warmup: int) -> dict:
    """Measured steps of every round (the first ``warmup`` of each process dropped)."""
    secs = [s for r in runs for s in r["seconds"][warmup:]]
    toks = [t for r in runs for t in r["tokens"][warmup:]]
    return {"s_per_step": statistics.median(secs), "tokens_per_s": sum(toks) / sum(secs), "steps": len(secs),
            "seconds": secs, "tokens": toks, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            **({"peak_gpu_mb": max(r["peak_gpu_mb"] for r in runs)} if "peak_gpu_mb" in runs[0] else {}),
            **({k: max(r[k] for r in runs) for k in ("setup_peak_gpu_mb", "steps_peak_gpu_mb") if k in runs[0]}),
            "params": runs[0].get("params"), "trainable": runs[0].get("trainable"),
            "setup_seconds": runs[0].get("setup_seconds"),
            "precomputed_reference": runs[0].get("precomputed_reference", False),
            "allocator": runs[0].get("allocator")}


def one_epoch(results: dict, name: str) -> float:
    """Tokens/s over one epoch with the one-time reference pass charged: every training token
    is scored once more by a forward-only pass (ulma's table_logps; TRL's precompute is a plain
    model(**batch) loop).  Equal to the step rate for runs that do the reference forward in-step."""
    rate = results[name]["tokens_per_s"]
    if not results[name].get("precomputed_reference"):  # the workload says whether its steps exclude the pass
        return rate
    fwd = results.get("forward-plain" if name.startswith("trl") else "forward-ulma")
    extra = results[name].get("reference_token_ratio", 1.0)  # KTO: the KL rows were scored too
    return 1 / (1 / rate + extra / fwd["tokens_per_s"]) if fwd else None  # None: the forward rate was not measured


def table(results: dict, peak: dict) -> str:
    mem = memory_label(results)
    lines = ["| run | ulma s/step | baseline s/step | ulma tokens/s | baseline tokens/s | speed-up | "
             f"speed-up, 1 epoch incl. reference pass | ulma {mem} | baseline {mem} | memory ratio | "
             "ulma MFU (fp32 peak / bf16 peak) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, b, what in PAIRS:
        if a not in results or b not in results:
            continue
        ra, rb = results[a], results[b]
        mfu = "—"
        if a.endswith("-full"):
            flops = 6 * ra["params"] * ra["tokens_per_s"]
            mfu = f"{flops / peak['fp32']:.1%} / {flops / peak['bf16']:.1%}"
        speed = ra["tokens_per_s"] / rb["tokens_per_s"]
        ea, eb = one_epoch(results, a), one_epoch(results, b)
        epoch = f"{ea / eb:.2f}x" if ra.get("precomputed_reference") and ea and eb else "—"
        lines.append(f"| {what} | {ra['s_per_step']:.2f} | {rb['s_per_step']:.2f} | {ra['tokens_per_s']:.0f} | "
                     f"{rb['tokens_per_s']:.0f} | **{speed:.2f}x** | {epoch} | {memory_mb(ra):.0f} | "
                     f"{memory_mb(rb):.0f} | {memory_mb(ra) / memory_mb(rb):.2f} | {mfu} |")
    return "\n".join(lines)


def lever_table(results: dict) -> str:
    mem = memory_label(results)
    lines = ["| lever | on: tokens/s | off: tokens/s | speed gain | speed gain, 1 epoch incl. reference pass | "
             f"on: {mem} | off: {mem} |",
             "|---|---|---|---|---|---|---|"]
    for on, off, what in LEVERS:
        if on in results and off in results:
            a, b = results[on], results[off]
            ea, eb = one_epoch(results, on), one_epoch(results, off)
            epoch = f"{ea / eb:.2f}x" if ea and eb else "—"
            lines.append(f"| {what} | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | "
                         f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x | {epoch} | {memory_mb(a):.0f} | "
                         f"{memory_mb(b):.0f} |")
    return "\n".join(lines)


def mfu_table(results: dict, peak: dict) -> str:
    """Model-FLOPs utilisation of every full fine-tuning run of ulma: 6 x parameters x
    non-padding tokens a second, against the matrix-product peak measured in the run.
    With shared prompts (DPO) a prompt token runs once but counts for each of its rows,
    so that figure is an effective rate, above what the GPU computed."""
    lines = ["| ulma full fine-tuning run | tokens/step | s/step | tokens/s | MFU (bf16 peak) | MFU (fp32 peak) |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name.startswith("ulma-") and "-full" in name and r.get("params"):
            flops = 6 * r["params"] * r["tokens_per_s"]
            lines.append(f"| {name} | {sum(r['tokens']) / len(r['tokens']):.0f} | {r['s_per_step']:.3f} | "
                         f"{r['tokens_per_s']:.0f} | {flops / peak['bf16']:.1%} | {flops / peak['fp32']:.1%} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def allocators(results: dict) -> str:
    """Which malloc each tool's workloads ran under (host memory depends on it)."""
    seen = {}
    for name, r in results.items():
        if name.startswith(("ulma-", "trl-")):
            seen.setdefault(name.split("-")[0], set()).add(r.get("allocator") or "not recorded")
    return "Allocators: " + "; ".join(f"{tool}: {', '.join(sorted(a))}" for tool, a in sorted(seen.items())) + "."


def tables(results: dict, peak: dict) -> str:
    parts = (table(results, peak), lever_table(results), mfu_table(results, peak), allocators(results))
    return "\n\n".join(t for t in parts if t)


def save(report: dict, out: Path, final: bool) -> None:
    """The run so far to out/<time>.json (after every workload, so a run stopped part-way
    keeps what it measured); at the end of a whole run (``final``) also out/latest.{json,md}."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / (report["date"].replace(":", "-") + ".json")] + ([out / "latest.json"] if final else [])
    for path in paths:
        tmp_path = path.with_suffix(".tmp")
        tmp_path.write_text(json.dumps(report, indent=1))
        os.replace(tmp_path, path)
    if final:
        (out / "latest.md").write_text(f"{report['table']}\n\nMachine: {json.dumps(report['machine'])}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="ulma vs TRL, side by side")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; each process runs its own steps")
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps per process and round")
    p.add_argument("--warmup", type=int, default=1, help="steps per process not measured")
    p.add_argument("--pairs", type=int, default=48, help="HH pairs written for the workloads (ulma precomputes the reference for all of them; 48 cover 5 steps of 8)")
    p.add_argument("--long-steps", type=int, default=150,
                   help="steps of the long-run workloads (*-long*), on rows of their own: long_steps x 8 / 0.8")
    p.add_argument("--rows", type=int, default=32, help="rows for forward-only")
    p.add_argument("--prompts", type=int, default=32, help="prompts for generation")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="the model every workload trains: ulma's offline default or a model folder")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="pairs.jsonl and unpaired.jsonl written before (benchmarks/gpu_prepare.py); "
                        "default: written now from the HH file under ../shared")
    p.add_argument("--only", nargs="*", help="workload pairs to run (their ulma names)")
    p.add_argument("--no-levers", action="store_true", help="skip the runs with one speed lever off")
    p.add_argument("--levers", nargs="*", help="only these lever-off workloads (their names)")
    p.add_argument("--keep-going", action="store_true", help="a failed workload is reported and left out")
    p.add_argument("--timeout", type=float, default=None, help="seconds one workload process may take")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 where its matrix products are fast (GPU, AMX/AVX512-BF16 CPU), else fp32")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--render", type=Path, metavar="JSON", help="print the tables of a saved run; run nothing")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        print(tables(saved["results"], saved["matmul_peak_flops"]))
        return 0
    os.environ["BENCH_BF16"] = "1" if precision(args.precision) == "bf16" else "0"
    os.environ["BENCH_MODEL"] = args.model
    pairs = [x[:2] for x in PAIRS if not args.only or x[0] in args.only]
    if args.only:  # in the order asked for: what matters most first, in case a run is cut short
        pairs.sort(key=lambda pr: args.only.index(pr[0]))
    if not args.no_levers:  # the side of a lever not run already: usually "off", for compile "on"
        ran = {n for pr in pairs for n in pr}
        extra = list(dict.fromkeys(n for lever in LEVERS for n in lever[:2] if n not in ran
                                   and (args.levers is None or n in args.levers)))
        pairs += [(n,) for n in (sorted(extra, key=args.levers.index) if args.levers else extra)]
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
              "settings": {"micro_batch": 8, "max_length": 256, "lr": 1e-5, **{k: str(v) if isinstance(v, Path) else v
                                                                              for k, v in vars(args).items()},
                           "precision": precision(args.precision)},
              "command": "make bench  (= benchmarks/.venv/bin/python benchmarks/run.py "
                         + " ".join(argv or sys.argv[1:]) + ")", "complete": False}
    runs: dict[str, list] = {}

    def results() -> dict:
        return {n: collect(v, args.warmup if not n.startswith(("forward", "generate")) else 0)
                for n, v in runs.items() if v}

    with tempfile.TemporaryDirectory(prefix="ulma-bench-") as tmp:
        tmp = Path(tmp)
        if args.data:
            for name in ("pairs.jsonl", "unpaired.jsonl"):
                shutil.copy(args.data / name, tmp / name)
            report["data"] = json.loads((args.data / "data.json").read_text())
        else:
            report["data"] = write_data(tmp, args.pairs, 250, args.model)
        if any(is_long(n) for pr in pairs for n in pr):  # one epoch of ulma's 80% for long_steps
            (tmp / "long").mkdir()
            report["long_data"] = write_data(tmp / "long", math.ceil(args.long_steps * MICRO / 0.8 / 2), 250, args.model)
        peak = run_one("matmul-peak", tmp, tmp, 0, args)
        report["matmul_peak_flops"] = peak["flops"]
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            done = set()  # a workload in two pairs runs once a round
            for pair in pairs:
                for name in (pair if r % 2 == 0 else pair[::-1]):
                    if name in done or (r and is_long(name)):
                        continue
                    done.add(name)
                    steps = args.warmup + args.steps if not name.startswith(("forward", "generate")) else 0
                    long = is_long(name)
                    result = run_one(name, tmp / "long" if long else tmp, tmp, args.long_steps if long else steps, args)
                    runs.setdefault(name, []).extend([result] if result else [])
                    report["results"] = results()
                    save(report, args.out, final=False)
    report["results"] = results()
    report["table"] = tables(report["results"], peak["flops"])
    report["complete"] = True
    print("\n" + report["table"])
    # latest.* is the last whole run: a part (--only, --levers, --no-levers) keeps its dated file only
    save(report, args.out, final=not (args.only or args.levers is not None or args.no_levers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
