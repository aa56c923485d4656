"""Checkpoints that are complete or absent: written to a temporary folder, then renamed.

Layout of ``OUTPUT/checkpoints/step-000040/``:
  model/         Hugging Face format (the LoRA adapter, or the full model) + tokenizer
  trainer.pt     optimizer, scheduler and RNG states
  deepspeed/     under DeepSpeed only: the engine's checkpoint (one optimizer partition per process)
  state.json     step, results so far and how the run was launched (written last: its presence
                 marks a complete checkpoint)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


def check_writable(out: Path) -> None:
    """Fail before training if the output folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(f"output folder {out} is not writable: {e}") from e


RUN_FILES = ("metrics.jsonl", "results.json", "reference_logps.pt", "checkpoints", "final", "logs")


def prepare_output(out: Path, *, resume: bool, overwrite: bool, delete: bool = True) -> None:
    """Check the output folder before any work: writable, and not silently mixing runs.

    A folder that holds an earlier run is an error unless ``resume`` (continue it) or
    ``overwrite`` (delete that run's files first) is set.  With several processes every
    one checks (so all fail alike) and only the main one deletes (``delete``).
    """
    check_writable(out)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if not existing or resume:
        return
    if not overwrite:
        raise FileExistsError(
            f"output folder {out} holds an earlier run ({', '.join(existing)}); "
            "set train.resume=true to continue it or train.overwrite=true to replace it"
        )
    if not delete:
        return
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def checkpoint_bytes(model) -> int:
    """Rough size of one checkpoint: the saved weights (the adapter, or the whole model)
    plus AdamW's two float32 moments per trainable parameter."""
    from ulma.models import is_peft

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = trainable if is_peft(model) else sum(p.numel() for p in model.parameters())
    return 4 * saved + 8 * trainable


def tokenizer_bytes(tokenizer) -> int:
    """Size of the tokenizer files saved beside every checkpoint (a few MiB for BPE vocabularies)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).iterdir())


def check_space(out: Path, model, tokenizer, keep: int) -> None:
    """Fail before training when the output folder cannot hold the checkpoints of the run:
    ``keep`` checkpoints, one more being written, and the final model."""
    per = checkpoint_bytes(model) + tokenizer_bytes(tokenizer)
    need = (max(keep, 1) + 1) * per + per
    free = shutil.disk_usage(out).free
    if free < need:
        raise OSError(
            f"output folder {out} has {free / 2**20:.1f} MiB free; this run's checkpoints need about "
            f"{need / 2**20:.1f} MiB ({max(keep, 1)} kept + 1 being written + final, {per / 2**20:.1f} MiB each)"
        )


def _atomic_dir(target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))


def _publish(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def atomic_save_model(target: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    tmp = _atomic_dir(target)
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def staging_dir(out: Path, step: int) -> Path:
    """A fresh temporary folder beside the checkpoint of ``step``, renamed into place by
    :func:`save_checkpoint` (other processes may write their parts into it first)."""
    return _atomic_dir(checkpoint_dir(out, step))


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int = 2,
                    state_dict: dict | None = None, optimizer_state: dict | None = None,
                    tmp: Path | None = None) -> Path:
    """``state_dict`` / ``optimizer_state``: the full (gathered) states when the model is
    sharded (FSDP); by default the model's and optimizer's own.  ``tmp``: a folder from
    :func:`staging_dir` that already holds parts of this checkpoint (DeepSpeed's engine
    state); it is published with the rest or deleted."""
    target = checkpoint_dir(out, step)
    tmp = tmp or _atomic_dir(target)
    try:
        model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp / "model")
        optim = optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(out / "checkpoints", keep)
    return target


def complete_checkpoints(folder: Path) -> list[Path]:
    if not folder.exists():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out / "checkpoints")
    return found[-1] if found else None


def _prune(folder: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; returns state.json."""
    load_weights(model, path / "model")
    return load_trainer_state(path, optimizer, scheduler)


def load_trainer_state(path: Path, optimizer, scheduler, load_optimizer=None) -> dict:
    """Restore optimizer, scheduler and RNG (not the weights); returns state.json.

    ``load_optimizer(saved)`` replaces ``optimizer.load_state_dict`` (sharded optimizers)."""
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    (load_optimizer or optimizer.load_state_dict)(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return json.loads((path / "state.json").read_text())


def load_weights(model, folder: Path) -> None:
    """Load a saved adapter (peft) or full model into an existing model, exactly."""
    from safetensors.torch import load_file

    from ulma.models import is_peft

    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
