"""Peak *allocated* tensor memory of a workload on a CPU: what ``torch.cuda.max_memory_allocated``
counts on a GPU, for explaining a GPU peak without a GPU.

    benchmarks/.venv/bin/python benchmarks/alloc_memory.py WORKLOAD --model DIR [--steps N] [--cuda-like]

WORKLOAD is ``ulma`` (ulma's ULMA LoRA step, as ``workloads.py ulma-ulma-lora``) or ``trl``
(TRL's KTOTrainer LoRA, as ``trl-kto-lora``), on the benchmark's HH rows.  The process runs
under ``torch.profiler`` with ``profile_memory``: every CPU allocation and free, with the bytes
live after it.  Printed as JSON: the peak before the first step (loading, ulma's reference
pass) and during the steps, the bytes live when the first step starts, the parameters' bytes
by dtype and the operator that allocated at each peak.  ``--cuda-like`` sets what runs
differently on CUDA (ulma's forward-only batches of 4x the micro-batch and fused output-layer
chunks of 512 rows; dropout's bool mask), so the figures stand for a GPU's.  Glibc's caching, the resident set and
allocator fragmentation are not counted; see trace_memory.py for those.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def allocations(prof) -> list[tuple[int, int, int, str, int]]:
    """(time ns, bytes, bytes live after it, allocating operator, address) of every CPU
    allocation and free, in order."""
    from torch._C._profiler import _EventType

    out = []

    def walk(event, ops):
        if event.tag == _EventType.Allocation:
            f = event.extra_fields
            if f.device.type == "cpu":  # the outermost operator (a backward node in the backward) and the innermost
                out.append((event.start_time_ns, f.alloc_size, f.total_allocated, " > ".join(ops[:1] + ops[-1:]), f.ptr))
            return
        for child in event.children:
            walk(child, ops + [event.name])

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, [])
    return sorted(out, key=lambda e: e[0])


def peak(events, start_ns: int, end_ns: int) -> dict:
    """The most bytes live between two times, and the operator whose allocation reached it."""
    window = [e for e in events if start_ns <= e[0] < end_ns]
    if not window:
        return {"mb": 0.0, "op": ""}
    top = max(window, key=lambda e: e[2])
    return {"mb": round(top[2] / 2**20, 1), "op": top[3]}


def live_at(events, t_ns: int) -> tuple[int, set[int]]:
    """Bytes live at a time, and the addresses of the blocks live then."""
    live: dict[int, int] = {}
    total = 0
    for e in events:
        if e[0] >= t_ns:
            break
        total = e[2]
        if e[1] > 0:
            live[e[4]] = e[1]
        else:
            live.pop(e[4], None)
    return total, set(live)


def untracked_bytes(model, live: set[int]) -> int:
    """Bytes of parameters and buffers not allocated under the profiler (memory-mapped from
    the checkpoint, as TRL's float32 weights are): on a GPU they would be allocated too."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        if s.data_ptr() not in live:
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def param_bytes(model) -> dict:
    by_dtype: dict[str, float] = {}
    for p in {p.data_ptr(): p for p in model.parameters()}.values():
        key = f"{str(p.dtype).removeprefix('torch.')}{'' if p.requires_grad else ' frozen'}"
        by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size() / 2**20
    return {k: round(v, 1) for k, v in by_dtype.items()}


def cuda_dropout(torch) -> None:
    """Dropout as CUDA runs it: ``native_dropout``, which keeps a bool mask for the backward;
    the CPU's eager dropout keeps a float mask of the input's size (4x the bytes in float32)."""
    import torch.nn.functional as F

    plain = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0 or inplace:
            return plain(input, p, training, inplace)
        return torch.native_dropout(input, p, True)[0]

    F.dropout = dropout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=["ulma", "trl"])
    p.add_argument("--model", required=True, help="a local model folder (random_model.py)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=64, help="HH pairs written for the run")
    p.add_argument("--cuda-like", action="store_true")
    p.add_argument("--train", nargs="*", default=[], help="ulma train settings key=value (ints, true/false)")
    a = p.parse_args()

    import os

    os.environ["BENCH_MODEL"], os.environ["BENCH_BF16"] = a.model, "1"
    import torch
    from torch.profiler import ProfilerActivity, profile

    import run
    import workloads

    marks: dict[str, int] = {}
    models = []
    work = Path(tempfile.mkdtemp(prefix="alloc-memory-"))
    run.write_data(work, a.rows, 250, a.model)
    train = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.train)}
    if a.cuda_like:
        import ulma.logprobs as lp

        lp.chunk_rows = lambda device, vocab: (lp.FUSED_CHUNK, lp.FUSED_CHUNK)
        train.setdefault("forward_batch_size", 4 * workloads.MICRO)
        cuda_dropout(torch)
    if a.workload == "ulma":
        from ulma.trainer import Trainer as owner

        name = "train_step"
        fn = lambda: workloads.run_ulma("ulma", True, work, a.steps, work / "out", train=train)  # noqa: E731
    else:
        from trl import KTOTrainer as owner

        name = "training_step"
        fn = lambda: workloads.run_trl("kto", True, work, a.steps, work / "out", precompute=False)  # noqa: E731
    step = getattr(owner, name)

    def marked_step(self, *args, **kw):  # the first step's start splits setup from steps
        marks.setdefault("first_step", time.time_ns())
        models.append(self.model)
        return step(self, *args, **kw)

    setattr(owner, name, marked_step)
    torch.manual_seed(0)
    t0 = time.time_ns()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    t1 = time.time_ns()
    events = allocations(prof)
    first = marks["first_step"]
    live, blocks = live_at(events, first)
    extra = untracked_bytes(models[0], blocks) / 2**20
    setup, steps = peak(events, t0, first), peak(events, first, t1)
    print(json.dumps({
        "workload": a.workload, "model": a.model, "steps": a.steps, "cuda_like": a.cuda_like, "train": train,
        # what a GPU would count: the profiler's peaks plus the weights it did not see allocated
        "peak_mb": round(max(setup["mb"], steps["mb"]) + extra, 1),
        "setup_peak": setup, "steps_peak": steps, "untracked_weights_mb": round(extra, 1),
        "live_at_first_step_mb": round(live / 2**20, 1), "parameters_mb": param_bytes(models[0]),
    }))


if __name__ == "__main__":
    main()
