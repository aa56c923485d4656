"""Training that survives faults: non-finite steps, SIGKILL mid-run, unwritable output."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_train import metrics, tiny_cfg
from ulma.config import load_config
from ulma.loop import NonFiniteLossError
from ulma.trainer import train


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_model_dir, pointwise_file, tmp_path):
    out = tmp_path / "nan"
    cfg = tiny_cfg(tiny_model_dir, pointwise_file, out, "method.pos_weight=.nan", "train.max_bad_steps=2",
                   "train.save_every=1")
    with pytest.raises(NonFiniteLossError, match="non-finite 2 steps in a row"):
        train(cfg)
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["skipped"] for r in rows] == [True]  # step 1 skipped and logged; step 2 stopped the run
    # step 1 was skipped, so the adapter never moved and the checkpoint holds clean weights
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-000001"]
    w = load_file(str(ckpts[0] / "model" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert all(v.abs().sum() == 0 for k, v in w.items() if "lora_B" in k)


def test_unwritable_output_fails_before_training(tiny_model_dir, pointwise_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        train(tiny_cfg(tiny_model_dir, pointwise_file, blocker / "run"))


def test_earlier_run_is_not_silently_mixed(tiny_model_dir, pointwise_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_model_dir, pointwise_file, out, "train.max_steps=1"))
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        train(tiny_cfg(tiny_model_dir, pointwise_file, out, "train.max_steps=1"))
    train(tiny_cfg(tiny_model_dir, pointwise_file, out, "train.max_steps=1", "train.overwrite=true"))
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1]


def _cli_args(model_dir, data, out, *extra):
    return [sys.executable, "-m", "ulma", "train", "/dev/null",
            f"model.name_or_path={model_dir}", "data.train.source=jsonl", f"data.train.path={data}",
            "data.eval_fraction=0.25", "data.max_length=64", "train.micro_batch_size=2", "train.grad_accum=1",
            "train.lr=1e-2", "train.warmup_ratio=0", "train.bf16=false", "train.progress=false",
            "train.max_steps=8", "train.save_every=1", "train.keep_checkpoints=3", f"train.output_dir={out}",
            "model.lora.r=4", "model.lora.dropout=0.1", *extra]


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tiny_model_dir, pointwise_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run(_cli_args(tiny_model_dir, pointwise_file, a), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(_cli_args(tiny_model_dir, pointwise_file, b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (b / "checkpoints" / "step-000003" / "state.json").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (b / "final").exists(), "the run finished before it could be killed"
    done = subprocess.run(_cli_args(tiny_model_dir, pointwise_file, b, "train.resume=true"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wa = load_file(str(a / "final" / "adapter_model.safetensors"))
    wb = load_file(str(b / "final" / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    assert [r["step"] for r in metrics(b) if "loss" in r] == list(range(1, 9))


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB file system (tmpfs), where the machine allows mounting one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_full_disk_is_an_error_before_training(tiny_model_dir, pointwise_file, small_disk):
    # full fine-tuning of the tiny model: 1.6M params -> ~6 MiB weights + ~12 MiB AdamW state + 3.5 MiB
    # tokenizer per checkpoint, 3 checkpoints + final: ~86 MiB > 24 MiB
    cfg = tiny_cfg(tiny_model_dir, pointwise_file, small_disk / "run", "model.lora.enabled=false")
    with pytest.raises(OSError, match=r"MiB free; this run's checkpoints need about"):
        train(cfg)
    assert not (small_disk / "run" / "metrics.jsonl").exists()
    # the LoRA adapter of the same model fits
    train(tiny_cfg(tiny_model_dir, pointwise_file, small_disk / "lora", "train.max_steps=1"))
    assert (small_disk / "lora" / "final" / "adapter_model.safetensors").exists()
