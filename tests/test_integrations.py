"""Integrations (issue 24): experiment trackers, LoRA on every Linear, QLoRA's CPU error.
The hub upload and `ulma merge` are in test_export.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ulma.config import ConfigError, load_config, validate
from ulma.train import train

from test_train import metrics, tiny_cfg


def event_scalars(folder) -> dict:
    """{tag: [(step, value), ...]} of every TensorBoard event file under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    out = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


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
