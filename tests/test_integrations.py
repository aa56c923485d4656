"""Integrations (issue 24): experiment trackers, LoRA on every Linear, QLoRA's CPU error.
The hub upload and `ulma merge` are in test_export.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ulma.config import ConfigError, load_config, validate
from ulma.trainer import train

from test_train import metrics, tiny_cfg


def event_scalars(folder) -> dict:
    """{tag: [(step, value), ...]} of TensorBoard's run in ``folder`` (all its event files,
    read as TensorBoard reads them: a resumed writer's purge_step discards later events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(folder.glob("events.out.tfevents.*")), f"no event file in {folder}"
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_the_metrics_rows(tiny_model_dir, pointwise_file, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(tiny_cfg(tiny_model_dir, pointwise_file, out, "train.max_steps=3", "train.report_to=[tensorboard]"))
    rows = metrics(out)
    scalars = event_scalars(out / "logs" / "ulma")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    # every number of every row, at its step (float32 in the event file); None values are left out
    for key in ("loss", "grad_norm", "lr", "seconds"):
        assert scalars[key] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train_rows]
    assert scalars["skipped"] == [(1, 0.0), (2, 0.0), (3, 0.0)]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3]
    assert scalars["eval/loss"] == [(r["step"], pytest.approx(r["eval/loss"], rel=1e-6)) for r in evals]
    expected_keys = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert set(scalars) == expected_keys


def test_a_resumed_run_replaces_the_interrupted_runs_later_events(tiny_model_dir, pointwise_file, tmp_path):
    """As metrics.jsonl drops its rows after the checkpoint, TensorBoard drops its events there."""
    pytest.importorskip("tensorboard")
    import shutil

    out = tmp_path / "run"
    extra = ["train.save_every=2", "train.max_steps=4", "train.report_to=[tensorboard]"]
    train(tiny_cfg(tiny_model_dir, pointwise_file, out, *extra))
    first = event_scalars(out / "logs" / "ulma")["loss"]
    shutil.rmtree(out / "checkpoints" / "step-000004")  # interrupted after step 2
    shutil.rmtree(out / "final")  # (the events of steps 3 and 4 stay in the first event file)
    train(tiny_cfg(tiny_model_dir, pointwise_file, out, *extra, "train.resume=true"))
    assert len(list((out / "logs" / "ulma").glob("events.out.tfevents.*"))) == 2
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    scalars = event_scalars(out / "logs" / "ulma")
    assert scalars["loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert scalars["loss"][:2] == first[:2]
    assert [s for s, _ in scalars["eval/loss"]] == [0, 4]


def test_tracker_options_config_and_values_by_hand():
    from ulma.tracking import init_kwargs, tracker_config, tracker_values

    assert init_kwargs("runs/ulma-hh") == {"wandb": {"name": "ulma-hh", "dir": "runs/ulma-hh"}}
    assert init_kwargs("runs/x", resumed_step=40)["tensorboard"] == {"purge_step": 41}
    config = {"model": {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "name_or_path": "m"},
              "data": {"eval": None, "train": {"options": {}}}, "train": {"report_to": []}}
    assert tracker_config(config) == {"model.lora.r": 8, "model.lora.target_modules": '["q_proj", "v_proj"]',
                                      "model.name_or_path": "m", "data.eval": None, "data.train.options": "{}",
                                      "train.report_to": "[]"}
    row = {"step": 3, "loss": 0.5, "loss_neg": None, "skipped": False, "grad_norm": float("nan"), "note": "x"}
    values = tracker_values(row)
    assert list(values) == ["loss", "skipped", "grad_norm"] and values["loss"] == 0.5 and values["skipped"] == 0.0
    assert values["grad_norm"] != values["grad_norm"]  # NaN is sent: a skipped step shows as one


def test_a_tracker_that_is_not_installed_or_not_known_fails_at_start(tiny_model_dir, pointwise_file, tmp_path):
    missing = next((n for n in ("clearml", "swanlab", "dvclive", "aim") if importlib.util.find_spec(n) is None), None)
    if missing is None:
        pytest.skip("every candidate tracker is installed here")
    cfg = tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "run", f"train.report_to=[{missing}]")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == (f"train.report_to: {missing} is not installed: pip install '{missing}' "
                            f"(or remove {missing} from train.report_to)")
    cfg = tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "run", "train.report_to=[tensorbored]")
    with pytest.raises(ConfigError, match=r"^train.report_to: unknown tracker 'tensorbored'; choose from \[.*'wandb'"):
        validate(cfg)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_wandb_missing_names_the_extra(tiny_model_dir, pointwise_file, tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    cfg = tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "run", "train.report_to=[wandb]")
    with pytest.raises(ConfigError, match=r"^train.report_to: wandb is not installed: pip install 'ulma\[wandb\]'"):
        validate(cfg)


def test_the_reward_loop_logs_its_rows_to_tensorboard_too(tiny_model_dir, tmp_path):
    """method: reward has its own loop (no Accelerator): the same trackers, through ulma.tracking."""
    pytest.importorskip("tensorboard")
    from conftest import write_jsonl
    from ulma.rlhf.reward import train_reward

    rows = [{"prompt": f"Describe thing {i}.", "chosen": "Thank you, happy to help.", "rejected": "Go away."}
            for i in range(16)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "rm"
    cfg = load_config("configs/reward.yaml", [
        f"model.name_or_path={tiny_model_dir}", "data.train.source=jsonl", f"data.train.path={data}",
        "data.eval_fraction=0.25", "data.eval_limit=null", "data.train.limit=null", "data.max_length=64",
        "train.micro_batch_size=4", "train.grad_accum=1", "train.bf16=false", "train.progress=false",
        f"train.output_dir={out}", "model.lora.r=4", "train.max_steps=2", "train.report_to=[tensorboard]"])
    train_reward(cfg)
    rows = metrics(out)
    scalars = event_scalars(out / "logs" / "ulma")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert scalars["loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    evals = [r for r in rows if "eval/pair_accuracy" in r]
    assert scalars["eval/pair_accuracy"] == [(r["step"], pytest.approx(r["eval/pair_accuracy"])) for r in evals]


def test_all_linear_puts_an_adapter_on_every_linear_but_the_output_layer(tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    from ulma.models import load_policy

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.lora.target_modules=all-linear"])
    assert cfg.model.lora.target_modules == "all-linear"
    model = load_policy(cfg.model)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer))
    # the tiny Llama: 2 layers x (q, k, v, o, gate, up, down); lm_head (tied to the embedding) has none
    per_layer = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                 "self_attn.q_proj", "self_attn.v_proj"]
    assert adapted == [f"model.layers.{i}.{m}" for i in (0, 1) for m in per_layer]
    # a list still means those module names; a number is neither form
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.lora.target_modules=[q_proj]"])
    assert cfg.model.lora.target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match=r"^model.lora.target_modules: 3 fits none of"):
        load_config(None, ["model.lora.target_modules=3"])


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None,
                    reason="this machine can load in 4 bits")
def test_load_in_4bit_without_a_gpu_is_one_config_error(tiny_model_dir, pointwise_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "run", "model.load_in_4bit=true")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == ("model.load_in_4bit needs a CUDA GPU and bitsandbytes (pip install 'ulma[qlora]'); "
                            "set model.load_in_4bit=false to train in full precision")
    with pytest.raises(ConfigError, match=r"^model.load_in_4bit: trains LoRA adapters on a frozen 4-bit base; "
                                          r"set model.lora.enabled=true$"):
        validate(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "run", "model.load_in_4bit=true",
                          "model.lora.enabled=false"))
    with pytest.raises(ConfigError, match=r"^model.load_in_4bit: not supported by method 'reward'"):
        validate(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "run", "model.load_in_4bit=true",
                          "method.name=reward"))


def test_load_in_4bit_from_the_command_line_is_one_line(tiny_model_dir, pointwise_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU here")
    from ulma.cli import main

    args = [f"model.name_or_path={tiny_model_dir}", "data.train.source=jsonl", f"data.train.path={pointwise_file}",
            f"train.output_dir={tmp_path / 'run'}", "model.load_in_4bit=true"]
    assert main(["train", "configs/sft.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert err == ("ulma: error: model.load_in_4bit needs a CUDA GPU and bitsandbytes (pip install 'ulma[qlora]'); "
                   "set model.load_in_4bit=false to train in full precision\n")
    assert not (tmp_path / "run").exists()
