"""A Llama-architecture model with random weights, for speed measurements at a size no
offline checkpoint has here: ``python random_model.py TOKENIZER_DIR OUT_DIR --shape 1b``.

Throughput does not depend on the weights' values, only on the shapes. The shapes are
SmolLM2's (its 49,152-token vocabulary, tied embeddings, so its tokenizer and chat
template apply):
  1b:   SmolLM2-1.7B's layers (hidden 2048, MLP 8192, 32 heads), 16 of its 24: 1.17B parameters
  tiny: 2 layers of hidden 64, for checking the script on a CPU
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


def build(tokenizer_dir: Path, out: Path, shape: str, seed: int = 0, layers: int | None = None) -> int:
    """Writes the model (bf16 safetensors) and the tokenizer files to ``out``; returns its parameter count.
    ``layers``: decoder layers instead of the shape's (alloc_memory.py extrapolates from a few)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = LlamaConfig.from_pretrained(tokenizer_dir)  # SmolLM2-135M's config: vocabulary, special ids, rope
    cfg = LlamaConfig(**{**base.to_dict(), **SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}), "head_dim": None, "tie_word_embeddings": True,
                         "max_position_embeddings": 2048})
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tokenizer_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--layers", type=int, help="decoder layers instead of the shape's")
    a = p.parse_args()
    n = build(a.tokenizer_dir, a.out, a.shape, layers=a.layers)
    print(f"{a.out}: {a.shape}, {n / 1e9:.3f}B parameters")


if __name__ == "__main__":
    main()
