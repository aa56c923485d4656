"""The fused output layer's forward and backward with a float32 (tied) weight under bf16
autocast: cast in vocabulary blocks (as shipped, ``ulma.logprobs.HEAD_BLOCK_BYTES``) against
one whole cast, alternating in one process; seconds and the largest tensor either keeps.

    OMP_NUM_THREADS=1 PYTHONPATH=src benchmarks/.venv/bin/python benchmarks/head_blocks.py --vocab 49152 --hidden 576
"""

import argparse
import json
import time

import torch

import ulma.logprobs as lp


def once(hidden, weight, targets, cap: int) -> float:
    lp.HEAD_BLOCK_BYTES = cap
    plan = lp.head_plan(weight, hidden.device, True)
    start = time.perf_counter()
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        out = lp.LinearTokenLogps.apply(hidden, weight, targets, *plan)
    out.sum().backward()
    if hidden.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--positions", type=int, default=1024, help="scored positions (8 rows of ~128 response tokens)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    hidden = torch.randn(a.positions, a.hidden, device=a.device, requires_grad=True)
    weight = torch.randn(a.vocab, a.hidden, device=a.device) * 0.02  # frozen float32, as LoRA's tied layer
    targets = torch.randint(0, a.vocab, (a.positions,), device=a.device)
    shipped = lp.HEAD_BLOCK_BYTES
    caps = {"blocks": shipped, "whole": 1 << 62}
    times = {k: [] for k in caps}
    for r in range(a.rounds + 1):  # round 0 warms up
        for name in (caps if r % 2 else reversed(list(caps))):
            t = once(hidden, weight, targets, caps[name])
            if r:
                times[name].append(t)
    lp.HEAD_BLOCK_BYTES = shipped
    block = lp.head_plan(weight, hidden.device, True)[2]
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(json.dumps({"vocab": a.vocab, "hidden": a.hidden, "positions": a.positions, "device": a.device,
                      "threads": torch.get_num_threads(), "block_rows": block,
                      "cast_mb": {"blocks": block * a.hidden * 2 / 2**20, "whole": a.vocab * a.hidden * 2 / 2**20},
                      "median_s": median, "blocks_over_whole": median["blocks"] / median["whole"]}))


if __name__ == "__main__":
    main()
