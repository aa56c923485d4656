"""Memory of ``train.bf16_frozen_weights``: a LoRA Trainer built with bf16 autocast, the
lever on and off, each in its own process; prints resident memory once every weight has
been read (as the first step reads them) and the parameters' bytes.

    benchmarks/.venv/bin/python benchmarks/frozen_memory.py [--model FOLDER]

For CPUs where a bf16 training step cannot be timed (without AMX/AVX512-BF16 a bf16
matrix product runs ~65x slower than float32 here): the lever's saving is in the weights,
which this measures without a step.  On a GPU, gpu.sh runs the lever in full
(ulma-ulma-lora-checkpointed-fp32-frozen).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(on: bool, model: str, data: Path) -> dict:
    sys.path.insert(0, str(HERE))
    import os

    os.environ["BENCH_MODEL"] = model
    import workloads
    from ulma.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        t = Trainer(workloads.ulma_config("ulma", True, data, 1, Path(out),
                                          train={"bf16": True, "bf16_frozen_weights": on}))
        read = sum(float(p.float().sum()) for p in t.model.parameters())  # touch every weight
        status = {k: int(v.split()[0]) / 1024 for k, v in
                  (line.split(":", 1) for line in open("/proc/self/status")) if k in ("VmRSS", "RssAnon", "RssFile")}
        return {"lever": on, "param_mb": sum(p.numel() * p.element_size() for p in t.model.parameters()) / 2**20,
                "rss_mb": status["VmRSS"], "anon_mb": status["RssAnon"], "file_mb": status["RssFile"],
                "checksum": read}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "on", args.model, args.data)))
        return
    from run import write_data

    with tempfile.TemporaryDirectory() as d:
        write_data(Path(d), 16, 250, args.model)
        rows = []
        for which in ("off", "on", "off", "on"):
            out = subprocess.run([sys.executable, __file__, "--child", which, "--model", args.model, "--data", d],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print("| bf16_frozen_weights | parameters MB | resident MB | anonymous MB | file-backed MB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['lever'] else 'off'} | {r['param_mb']:.0f} | {r['rss_mb']:.0f} | {r['anon_mb']:.0f} | "
              f"{r['file_mb']:.0f} |")


if __name__ == "__main__":
    main()
