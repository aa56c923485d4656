"""Two processes on the CPU (gloo) train exactly like one process with the same global batch."""

import json
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
    _train_here(_args(tiny_model_dir, pointwise_file, one, 4))
    args2 = _args(tiny_model_dir, pointwise_file, two, 2)
    # the 2 processes compile their layers (dynamo only, the "eager" backend: see the FSDP test)
    r2 = subprocess.run([sys.executable, "-m", "ulma", "train", "--num-processes", "2", *args2[1:],
                         "train.compile=true", "train.compile_backend=eager"],
                        capture_output=True, text=True, timeout=300)  # re-launches itself through torchrun
    assert r2.returncode == 0, r2.stderr[-3000:]
    results = json.loads((two / "results.json").read_text())
    assert (results["processes"], results["compiled_layers"]) == (2, 2)
    l1 = [r["loss"] for r in metrics(one) if "loss" in r]
    l2 = [r["loss"] for r in metrics(two) if "loss" in r]
    assert len(l1) == len(l2) == 3 and l1 == pytest.approx(l2, rel=1e-4)
    w1 = load_file(str(one / "final" / "adapter_model.safetensors"))
    w2 = load_file(str(two / "final" / "adapter_model.safetensors"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this python")
@pytest.mark.parametrize("method", ["kto", "bco"])
def test_two_processes_match_one_for_kto_and_bco(method, tiny_model_dir, pointwise_file, tmp_path):
    """KTO's z0 is the mean over the whole micro-batch's KL rows (gathered from both processes,
    as TRL gathers it) and BCO's running mean moves by the whole step's rewards on both
    processes: 2 processes x 2 units give the losses and weights of 1 process x 4 units."""
    one, two = tmp_path / "one", tmp_path / "two"
    _train_here([*_args(tiny_model_dir, pointwise_file, one, 4), f"method.name={method}"])
    args2 = [*_args(tiny_model_dir, pointwise_file, two, 2), f"method.name={method}"]
    r2 = subprocess.run([sys.executable, "-m", "ulma", "train", "--num-processes", "2", *args2[1:]],
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    l1 = [r["loss"] for r in metrics(one) if "loss" in r]
    l2 = [r["loss"] for r in metrics(two) if "loss" in r]
    assert len(l1) == len(l2) == 3 and l1 == pytest.approx(l2, rel=1e-4)
    w1 = load_file(str(one / "final" / "adapter_model.safetensors"))
    w2 = load_file(str(two / "final" / "adapter_model.safetensors"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


GATHER_KL = """
import types, torch
from accelerate import Accelerator
from ulma.methods import LossInputs
from ulma.trainer import Trainer

acc = Accelerator(cpu=True)
r = acc.process_index
mine = [1.0, 2.0] if r == 0 else [3.0, 4.0, 5.0]  # uneven shares: padded with NaN, then dropped
inp = LossInputs(torch.tensor(mine, requires_grad=True), None, torch.zeros(len(mine)), torch.zeros(len(mine)).bool(),
                 True, kl_policy=torch.tensor(mine), kl_ref=-torch.tensor(mine))
out = Trainer._kl_over_processes(types.SimpleNamespace(acc=acc), inp)
assert sorted(out.kl_policy.tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0], out.kl_policy
assert sorted(out.kl_ref.tolist()) == [-5.0, -4.0, -3.0, -2.0, -1.0], out.kl_ref
print("gathered", r, out.kl_policy.tolist(), flush=True)
torch.distributed.destroy_process_group()  # gloo's threads must not outlive the interpreter (pytorch#190489)
"""


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this python")
def test_kto_kl_rows_are_gathered_from_every_process(tmp_path):
    """The step test above cannot tell (z0 clamps to 0 on its data): here each process's own KL
    rows, 2 and 3 of them, come back as all 5 on both processes."""
    import os

    import ulma

    script = tmp_path / "gather.py"
    script.write_text(GATHER_KL)
    src = str(Path(ulma.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("gathered") == 2


# ---------------------------------------------------------------- FSDP2 on the CPU
# accelerate runs an FSDP config on the CPU as plain DDP; ulma switches it to FSDP2 over gloo
# (ulma.trainer.make_accelerator), so FSDP's sharded weights, gradients, optimizer states,
# state-dict gathering and checkpoints are tested here without a GPU.
ACCELERATE = Path(sys.executable).with_name("accelerate")
FSDP_CPU = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp_cpu.yaml"
needs_accelerate = pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate is not installed beside this python")


def _accelerate_launch(config: Path, args: list[str], launch: tuple[str, ...] = ()) -> None:
    import os

    import ulma

    src = str(Path(ulma.__file__).resolve().parents[1])  # the processes import this ulma, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([str(ACCELERATE), "launch", "--config_file", str(config), "--main_process_port", "0",
                        *launch, "-m", "ulma", *args], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def _train_here(args: list[str]) -> None:
    from ulma.config import load_config
    from ulma.trainer import train

    train(load_config(None, args[2:]))  # args[:2] == ["train", "/dev/null"]


def _losses(out):
    """Per step: the loss and its positive and negative group means (the reference enters the latter)."""
    return [x for r in metrics(out) if "loss" in r for x in (r["loss"], r["loss_pos"], r["loss_neg"])]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return float((a - b).abs().max()) <= rel * float(a.abs().max())


@needs_accelerate
def test_fsdp_two_processes_match_one_lora(tiny_model_dir, pointwise_file, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _train_here(_args(tiny_model_dir, pointwise_file, one, 4))
    _accelerate_launch(FSDP_CPU, _args(tiny_model_dir, pointwise_file, two, 2))
    results = json.loads((two / "results.json").read_text())
    assert (results["processes"], results["distributed"]) == (2, "FSDP2")  # not DDP in disguise
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 3 * 3 and l1 == pytest.approx(l2, rel=1e-4)
    w1 = load_file(str(one / "final" / "adapter_model.safetensors"))
    w2 = load_file(str(two / "final" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


@needs_accelerate
def test_fsdp_full_finetuning_resumes_and_writes_full_checkpoints(tiny_model_dir, pointwise_file, tmp_path):
    """Full fine-tuning with a live (frozen copy) reference: a 1-process run's checkpoint is
    resumed by 2 FSDP processes (weights loaded before sharding, the optimizer state scattered
    to the shards); they end where the uninterrupted run does, and the checkpoint they write
    holds the full, gathered optimizer state and a model that from_pretrained loads.
    The 2 processes compile their layers (``train.compile``, policy and reference copy): the
    losses stay those of the eager run.  With the "eager" backend: dynamo's tracing around
    FSDP2's hooks is what is tested here (+~20 s); code generation (inductor) would take
    minutes on 2 single-thread processes, and compiled graphs (aot_eager) are compared with
    eager layers in test_models."""
    extra = ["model.lora.enabled=false", "model.reference=live", "train.lr=1e-3", "train.save_every=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    _train_here(_args(tiny_model_dir, pointwise_file, one, 4) + extra)  # checkpoints after steps 2 and 3
    shutil.copytree(one, two)  # ... and the same run interrupted after step 2
    shutil.rmtree(two / "checkpoints" / "step-000003")
    shutil.rmtree(two / "final")
    (two / "results.json").unlink()
    _accelerate_launch(FSDP_CPU, _args(tiny_model_dir, pointwise_file, two, 2) + extra
                       + ["train.resume=true", "train.compile=true", "train.compile_backend=eager"])

    assert [r["step"] for r in metrics(two) if "loss" in r] == [1, 2, 3]
    results = json.loads((two / "results.json").read_text())
    assert (results["distributed"], results["compiled_layers"]) == ("FSDP2", 2)
    assert _losses(one) == pytest.approx(_losses(two), rel=1e-4)
    w1, w2 = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys()  # the tied lm_head is not written twice
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    assert all(torch.equal(loaded[k], w2[k]) for k in w2)
    # the optimizer state written under FSDP: keyed by parameter name, complete, equal to 1 process's
    o1 = torch.load(one / "checkpoints" / "step-000003" / "trainer.pt", weights_only=False)["optimizer"]
    o2 = torch.load(two / "checkpoints" / "step-000003" / "trainer.pt", weights_only=False)["optimizer"]
    names = o2["param_groups"][0]["params"]
    assert o1["param_groups"][0]["params"] == list(range(len(names)))
    for i, name in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            assert _close(o1["state"][i][key], o2["state"][name][key], rel=1e-4), (name, key)


# ---------------------------------------------------------------- DeepSpeed ZeRO on the CPU
# DeepSpeed's CPU accelerator talks gloo when oneCCL is not installed; ulma fixes accelerate's
# process counts there (ulma.trainer.make_accelerator).  Runs where deepspeed is installed.
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@needs_accelerate
@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed is not installed")
@pytest.mark.parametrize("config,extra,weights,relaunch", [
    ("zero2.yaml", [], "adapter_model.safetensors", False),  # LoRA, ZeRO-2
    ("zero3.yaml", ["model.lora.enabled=false", "train.lr=1e-3"], "model.safetensors", True),  # full, ZeRO-3
])
def test_deepspeed_two_processes_match_one(config, extra, weights, relaunch, tiny_model_dir, pointwise_file,
                                           tmp_path):
    """2 DeepSpeed processes train like 1 process; the same run interrupted after step 2
    refuses to resume in 1 plain process and (ZeRO-3, ``relaunch``) resumes in 2 from the
    engine's checkpoint, ending with the uninterrupted run's weights.  The resuming launch
    (~25 s on 2 cores) runs for one stage only: both stages resume through one
    ``load_checkpoint`` of the engine (ulma.trainer.Trainer._maybe_resume), and stage 3's
    partitioned weights are the harder case."""
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    extra = extra + ["train.save_every=2"]  # checkpoints after steps 2 and 3
    _train_here(_args(tiny_model_dir, pointwise_file, one, 4) + extra)
    _accelerate_launch_n(CONFIGS / config, _args(tiny_model_dir, pointwise_file, two, 2) + extra)
    assert json.loads((two / "results.json").read_text())["distributed"] == "DEEPSPEED"
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 3 * 3 and l1 == pytest.approx(l2, rel=1e-4)
    w1, w2 = load_file(str(one / "final" / weights)), load_file(str(two / "final" / weights))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k

    shutil.copytree(two, resumed)  # the 2-process run, interrupted after step 2
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    shutil.rmtree(resumed / "final")
    (resumed / "results.json").unlink()
    assert (resumed / "checkpoints" / "step-000002" / "deepspeed" / "engine").is_dir()
    with pytest.raises(RuntimeError, match="distributed=DEEPSPEED, zero_stage=., processes=2 and this run has "
                                           "distributed=NO, processes=1"):
        _train_here(_args(tiny_model_dir, pointwise_file, resumed, 4) + extra + ["train.resume=true"])
    if not relaunch:
        return
    _accelerate_launch_n(CONFIGS / config, _args(tiny_model_dir, pointwise_file, resumed, 2) + extra
                         + ["train.resume=true"])
    assert [r["step"] for r in metrics(resumed) if "loss" in r] == [1, 2, 3]
    assert _losses(resumed) == pytest.approx(l2, rel=1e-5)
    w3 = load_file(str(resumed / "final" / weights))
    for k in w2:
        assert torch.allclose(w2[k], w3[k], atol=1e-6), k


def _accelerate_launch_n(config: Path, args: list[str]) -> None:
    """The shipped GPU config, with 2 processes."""
    _accelerate_launch(config, args, launch=["--num_processes", "2"])


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this python")
def test_reward_model_two_processes_match_one(tiny_model_dir, tmp_path):
    """The reward model's loop runs data-parallel like the policy loop: 2 processes with half
    the micro-batch each take the steps of 1 process (losses, pair accuracy, final weights)."""
    from test_rlhf_reward import BAD, GOOD, TOPICS, tiny_args

    from conftest import write_jsonl

    rows = [{"prompt": f"Please describe {t} (question {i}).", "chosen": GOOD[i % 3].format(t=t),
             "rejected": BAD[i % 3].format(t=t)} for i, t in enumerate(TOPICS * 2)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    one, two = tmp_path / "one", tmp_path / "two"

    def args(out, micro):
        return [*tiny_args(tiny_model_dir, data, out, "train.max_steps=3", "train.group_by_length=false",
                           "method.name=reward"), f"train.micro_batch_size={micro}", "train.grad_accum=2"]

    _train_here(["train", "/dev/null", *args(one, 4)])
    r2 = subprocess.run([sys.executable, "-m", "ulma", "train", "--num-processes", "2", "/dev/null", *args(two, 2)],
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads((two / "results.json").read_text())["processes"] == 2
    keys = ("loss", "train_pair_accuracy", "grad_norm")
    m1 = [[r[k] for k in keys] for r in metrics(one) if "loss" in r]
    m2 = [[r[k] for k in keys] for r in metrics(two) if "loss" in r]
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        assert a == pytest.approx(b, rel=1e-4)
    w1, w2 = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
