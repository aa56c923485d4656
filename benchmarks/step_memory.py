"""Memory of a run's training steps alone, traced step by step, under one allocator setting.

    PYTHONPATH=src python benchmarks/step_memory.py VARIANT STEPS [key=value ...]

The steps of issue 27's run (configs/ulma_hh.yaml on the HH file under ../shared, 1200
examples, grad_accum 1, lr 3e-4; more overrides after STEPS) without its reference pass:
the reference log-probs are zeros, which changes the loss, not a tensor's shape.  VARIANT
joins settings with "+": ``asis`` (glibc as it is), ``cli`` (what ``ulma train`` sets,
:func:`ulma.memory.configure`), ``mmapKB`` (a fixed mmap threshold of KB KiB), ``arenaN``
(M_ARENA_MAX), ``trim`` (``malloc_trim(0)`` after every step).  Each step is a phase of
:mod:`trace_memory` (RSS, glibc's heap, CPU seconds and page faults), written to
/tmp/step_memory-VARIANT.jsonl as it ends and printed at the end.
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trace_memory as tm  # noqa: E402

HERE = Path(__file__).resolve().parent
HH = HERE.parent.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.part.jsonl.gz"


def main() -> None:
    variant, steps, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    libc = ctypes.CDLL("libc.so.6")
    parts = variant.split("+")
    if "cli" in parts:
        from ulma.memory import configure

        configure()
    for part in parts:
        if part.startswith("mmap"):
            libc.mallopt(-3, int(part[4:]) << 10)  # M_MMAP_THRESHOLD
        if part.startswith("arena"):
            libc.mallopt(-8, int(part[5:]))  # M_ARENA_MAX
    import torch

    if "trimbwd" in parts:  # malloc_trim(0) between each micro-batch's forward and backward
        backward = torch.Tensor.backward
        torch.Tensor.backward = lambda self, *a, **k: (libc.malloc_trim(0), backward(self, *a, **k))[1]
    from ulma.config import load_config
    from ulma.trainer import Trainer

    cfg = load_config(str(HERE.parent / "configs" / "ulma_hh.yaml"), [
        f"data.train.path={HH}", "data.train.limit=1200", "data.eval_limit=8", "train.grad_accum=1",
        "train.lr=3e-4", f"train.output_dir=/tmp/step_memory-{variant}", "train.overwrite=true",
        "train.progress=false", *extra])
    t = Trainer(cfg)
    n = len(t.data.train.table)
    ref = {"sum": torch.zeros(n), "count": torch.ones(n, dtype=torch.long)}
    t.model.train()
    tracer = tm.Tracer(0.05, f"/tmp/step_memory-{variant}.jsonl")
    t0 = time.time()
    for k in range(steps):
        tracer.phase(f"step {k + 1}")
        t.train_step(k, ref)
        if "trim" in parts:
            libc.malloc_trim(0)
    rows = tracer.close()
    print(f"{variant}: {time.time() - t0:.0f} s")
    for r in rows[1:-1]:
        m, e, f = r["max"], r["end"], r["first"]
        print(f"{r['phase']:>8s}: peak RSS {m['rss']:.0f} MB, in use {m['in_use']:.0f}, heap {m['heap']:.0f} "
              f"(mmapped {m['mmapped']:.0f}); at its end RSS {e['rss']:.0f}, free {e['free']:.0f}; "
              f"CPU user {e['user_s'] - f['user_s']:.1f} s, system {e['system_s'] - f['system_s']:.1f} s, "
              f"{(e['minflt'] - f['minflt']) / 1000:.0f}k page faults")


if __name__ == "__main__":
    main()
