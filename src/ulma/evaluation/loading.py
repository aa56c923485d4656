"""Load a model to evaluate: a base model, a LoRA adapter, a full checkpoint, or a run.

What ``MODEL`` may name:

- a run folder of ``ulma train`` (``results.json`` + ``final/``): its final model, and
  its config (method, data, seed) for the reports;
- a checkpoint folder (``checkpoints/step-N/``, whose weights are in ``model/``);
- a peft adapter folder (``adapter_config.json``): loaded on its base model and merged;
- a full Hugging Face model folder (``config.json``);
- a hub id or the offline alias ``smollm2-135m-instruct``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ulma.evaluation.io import EvalError, read_json
from ulma.models import load_tokenizer, resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ModelSpec:
    """Where the weights of one model to evaluate are."""

    kind: str  # "adapter" | "full" | "name"
    folder: str  # the adapter or model folder, or a hub id / alias
    base: str | None = None  # an adapter's base model
    run_dir: Path | None = None  # the training run it came from, if any
    run_config: dict | None = field(default=None, repr=False)  # that run's full config (results.json)

    def describe(self) -> str:
        return f"{self.folder} (adapter on {self.base})" if self.kind == "adapter" else self.folder


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else that does not exist is a missing folder
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def resolve_model(name: str, base: str | None = None) -> ModelSpec:
    """Find the weights that ``name`` names (see the module docstring); raises
    FileNotFoundError with what to do when a folder holds no model."""
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_path(name):
            raise FileNotFoundError(f"model {name!r}: no such file or folder")
        return ModelSpec("name", name)
    run_dir, config = None, None
    if (path / "results.json").exists() or (path / "checkpoints").is_dir():
        run_dir, config = path, _run_config(path)
        path = path / "final"
        if not path.is_dir():
            found = sorted((run_dir / "checkpoints").glob("step-*/model"))
            hint = f"; evaluate a checkpoint instead, e.g. {found[-1].parent}" if found else ""
            raise FileNotFoundError(
                f"run {run_dir} has no final model ({path} is missing: training not finished?){hint}")
    elif (path / "model").is_dir() and (path / "state.json").exists():
        path = path / "model"  # a checkpoint: checkpoints/step-N/model
    return _spec_for_folder(path, base, run_dir, config)


def _spec_for_folder(path: Path, base, run_dir, config) -> ModelSpec:
    if (path / "adapter_config.json").exists():
        cfg = json.loads((path / "adapter_config.json").read_text())
        base = base or cfg.get("base_model_name_or_path")
        if not base:
            raise FileNotFoundError(f"{path}/adapter_config.json names no base model; pass --base")
        return ModelSpec("adapter", str(path), base, run_dir, config)
    if (path / "config.json").exists():
        return ModelSpec("full", str(path), None, run_dir, config)
    raise FileNotFoundError(f"{path} holds no model (no adapter_config.json or config.json)")


def _run_config(run_dir: Path) -> dict | None:
    results = run_dir / "results.json"
    return read_json(results).get("config") if results.exists() else None


def reference_model(spec: ModelSpec) -> str:
    """The model ``spec`` was trained from (an adapter's base, a run's ``model.name_or_path``):
    the reference of its implicit reward; a ValueError when nothing names it."""
    if spec.kind == "adapter":
        return spec.base
    name = ((spec.run_config or {}).get("model") or {}).get("name_or_path")
    if not name:
        raise ValueError(f"{spec.folder}: no reference model known (not an adapter, not a run folder); "
                         "pass --reference MODEL, the model it was trained from")
    return name


def load_model(spec: ModelSpec, dtype: str = "float32", device: str | None = None):
    """(model in eval mode, tokenizer) for ``spec``; an adapter is merged into its base."""
    from transformers import AutoModelForCausalLM

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = spec.base if spec.kind == "adapter" else spec.folder
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(weights), dtype=DTYPES[dtype])
    except OSError as e:  # not a folder and not on (or no access to) the hub
        raise EvalError(f"cannot load model {weights!r}: {e}") from e
    if spec.kind == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.folder).merge_and_unload()
    has_tokenizer = (Path(spec.folder) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(spec.folder if has_tokenizer or spec.kind != "adapter" else spec.base)
    model.config.use_cache = True
    return model.to(dev).eval(), tokenizer


def run_meta(spec: ModelSpec, dataset: str | None = None) -> dict:
    """What the reports group by: method, data set and seed (a model that was not trained
    here is the method "base")."""
    cfg = spec.run_config or {}
    data = cfg.get("data") or {}
    source = (data.get("eval") or data.get("train") or {})
    return {
        "model": spec.describe(),
        "run": str(spec.run_dir) if spec.run_dir else None,
        "method": (cfg.get("method") or {}).get("name", "base"),
        "seed": (cfg.get("train") or {}).get("seed"),
        "dataset": dataset or dataset_name(source.get("source"), source.get("path")),
    }


GENERIC_FORMATS = ("jsonl", "trl", "json", "csv", "parquet", "hf")


def dataset_name(source: str | None, path: str | None) -> str | None:
    """A short name for a data set: the source, or a generic file's stem."""
    if source in GENERIC_FORMATS and path:
        return Path(path).name.split(".")[0]
    return source
