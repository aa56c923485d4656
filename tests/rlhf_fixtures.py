"""Fixtures of the RLHF tests: a word-level tokenizer (a vocabulary unlike SmolLM2's) and a
tiny Llama on it whose next-token distribution is peaked enough for PPO to move in a few steps."""

from __future__ import annotations

import pytest
import torch

WORDS = (["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", ":", ".", ",", "?", "tell", "me",
          "about", "topic", "number", "please", "yes", "no", "good", "bad", "the", "a", "is", "it", "and"]
         + [str(i) for i in range(10)] + [f"w{i}" for i in range(30)])
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} : {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant : {% endif %}")


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    """(tokenizer, vocabulary list): one id per whitespace/punctuation-separated word, ChatML-like template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
    folder = tmp_path_factory.mktemp("word-tokenizer")
    tok.save_pretrained(folder)
    from ulma.models import load_tokenizer

    return load_tokenizer(str(folder)), list(WORDS)


@pytest.fixture(scope="session")
def word_policy_dir(tmp_path_factory, word_tokenizer):
    """A 2-layer Llama over the word vocabulary.  The final norm's weight is scaled by 10 so the
    logits are peaked (a random model's logits are otherwise ~0: uniform over the vocabulary),
    while the residual stream, and so what LoRA on the attention can change, keeps its scale."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, vocab = word_tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.norm.weight.mul_(10.0)
    folder = tmp_path_factory.mktemp("word-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
