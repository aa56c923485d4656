"""Two processes on the CPU (gloo) train exactly like one process with the same global batch."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import metrics

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _args(model_dir, data, out, micro):
    return ["train", "/dev/null", f"model.name_or_path={model_dir}", "data.train.source=jsonl",
            f"data.train.path={data}", "data.eval_fraction=0.25", "data.max_length=64",
            f"train.micro_batch_size={micro}", "train.grad_accum=2", "train.lr=1e-2", "train.warmup_ratio=0",
            "train.bf16=false", "train.progress=false", "train.max_steps=3", "train.group_by_length=false",
            f"train.output_dir={out}", "model.lora.r=4", "model.lora.dropout=0.0", "method.name=ulma"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this python")
def test_two_processes_match_one(tiny_model_dir, pointwise_file, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "ulma", *_args(tiny_model_dir, pointwise_file, one, 4)],
                        capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    args2 = _args(tiny_model_dir, pointwise_file, two, 2)
    r2 = subprocess.run([sys.executable, "-m", "ulma", "train", "--num-processes", "2", *args2[1:]],
                        capture_output=True, text=True, timeout=300)  # re-launches itself through torchrun
    assert r2.returncode == 0, r2.stderr[-3000:]
    import json

    assert json.loads((two / "results.json").read_text())["processes"] == 2
    l1 = [r["loss"] for r in metrics(one) if "loss" in r]
    l2 = [r["loss"] for r in metrics(two) if "loss" in r]
    assert len(l1) == len(l2) == 3 and l1 == pytest.approx(l2, rel=1e-4)
    w1 = load_file(str(one / "final" / "adapter_model.safetensors"))
    w2 = load_file(str(two / "final" / "adapter_model.safetensors"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
