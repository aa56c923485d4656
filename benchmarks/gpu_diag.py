"""Where an ulma step's time goes on a GPU: step times on new and on already-seen batch
shapes, a profile of 3 steps, the same with cuDNN attention off, AdamW loop vs fused, and
forward-only passes cold and warm.  LoRA and full fine-tuning, in one process.

    BENCH_MODEL=/tmp/m python benchmarks/gpu_diag.py     (after benchmarks/random_model.py; see gpu.sh)

What it found is summarised in benchmarks/README.md ("Measurements behind the code's defaults").
"""
import os, sys, time
import torch
sys.path.insert(0, "benchmarks")
os.environ.setdefault("BENCH_BF16", "1")
MODEL = os.environ["BENCH_MODEL"]
import workloads as W
from ulma.trainer import Trainer
from pathlib import Path
from torch.profiler import profile, ProfilerActivity

DATA = Path(".gpu/data")

def sync():
    if torch.cuda.is_available(): torch.cuda.synchronize()

def steps(tr, ref, idx, label):
    out = []
    units = tr.data.train
    for s in idx:
        micro = tr.plan[s]
        tok = sum(len(units.table.sequences[r].input_ids) for i in micro for r in units.rows[i])
        width = max(len(units.table.sequences[r].input_ids) for i in micro for r in units.rows[i])
        sync(); t0 = time.perf_counter(); tr.train_step(s, ref); sync()
        out.append(f"{s}:{tok}t/w{width}:{time.perf_counter()-t0:.3f}")
    print(label, " ".join(out), flush=True)

def prof(tr, ref, idx, label):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for s in idx:
            tr.train_step(s, ref)
        sync()
    print(f"--- {label}: by CUDA total", flush=True)
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)
    print(f"--- {label}: by CPU self", flush=True)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60), flush=True)

t_start = time.time()
for lora in (True, False):
    tr = Trainer(W.ulma_config("ulma", lora, DATA, 30, Path(f"/tmp/diag-{lora}")))
    ref, _ = tr._reference_caches()
    tr.model.train()
    name = "lora" if lora else "full"
    steps(tr, ref, range(0, 10), f"[{name}] first pass")
    steps(tr, ref, range(0, 10), f"[{name}] same shapes again")
    prof(tr, ref, range(10, 13), f"{name} new shapes")
    torch.backends.cuda.enable_cudnn_sdp(False)
    steps(tr, ref, range(13, 23), f"[{name}] new shapes, cuDNN SDPA off")
    torch.backends.cuda.enable_cudnn_sdp(True)
    if not lora:
        params = [p for p in tr.model.parameters() if p.requires_grad]
        for p in params: p.grad = torch.zeros_like(p)
        for fused in (False, True):
            opt = torch.optim.AdamW(params, lr=1e-9, fused=fused, foreach=None if fused else True)
            opt.step(); sync(); t0 = time.perf_counter()
            for _ in range(5): opt.step()
            sync(); print(f"AdamW fused={fused}: {(time.perf_counter()-t0)/5*1000:.1f} ms/step", flush=True)
            del opt
    del tr, ref
    torch.cuda.empty_cache()
    print(f"elapsed {time.time()-t_start:.0f} s", flush=True)

# forward-only, twice each in one process (the second pass is warm)
for impl in ("ulma", "plain"):
    for k in range(2):
        r = W.run_forward(impl, DATA, 256)
        print(f"forward {impl} pass {k}: {r['seconds'][0]:.2f} s, {r['tokens'][0]/r['seconds'][0]:.0f} tok/s", flush=True)
print(f"elapsed {time.time()-t_start:.0f} s", flush=True)
