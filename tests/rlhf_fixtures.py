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


# ---------------------------------------------------------------- a fixed rollout (no sampling)
# (prompt tokens cut from the left, response words, ended by the stop token): the first four
# rows have shorter prompts and the longest response (6 words, no stop token: cut at
# ppo.max_new_tokens=6); the last four the widest prompts and responses of at most 4 tokens.
FIXED_ROWS = [(3, "yes it is good", True), (5, "no", True), (4, "w1 w2 w3 w4 w5 w6", False), (3, "", True),
              (0, "good", True), (1, "a bad w7", True), (0, "yes and no", True), (2, "it", True)]


def fixed_rollout(trainer, rows):
    """The Rollout of FIXED_ROWS[r] for r in ``rows``, answering the trainer's prompts r."""
    from ulma.rlhf.ppo import laid_out

    tok = trainer.tokenizer
    vocab = tok.get_vocab()
    answers = [[vocab[w] for w in words.split()] + ([tok.eos_token_id] if stop else []) for _, words, stop in
               (FIXED_ROWS[r] for r in rows)]
    width = max(len(a) for a in answers)
    response = torch.tensor([a + [tok.pad_token_id] * (width - len(a)) for a in answers])
    return laid_out(tok, [trainer.prompts[r] for r in rows],
                    [trainer.prompt_ids[r][FIXED_ROWS[r][0]:] for r in rows], response)


def length_reward(prompts, texts, token_ids):
    """A reward known in advance: response length / 6, minus 1 for each "no"."""
    return torch.tensor([len(t.split()) / 6 - t.split().count("no") for t in texts])


def perturb(trainer) -> None:
    """Seeded non-zero LoRA B and value head (they start at 0): the policy differs from the
    reference and the values from 0, so the tests compare numbers that are not all equal."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in trainer.inner.named_parameters():
            if "lora_B" in name or "value_head" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def score(trainer, ro):
    """``ro`` scored by the trainer's policy, value head, reference and reward."""
    from ulma.rlhf.ppo import score_rollout

    score_rollout(ro, trainer.inner, trainer.reference, trainer.reward, trainer.cfg.ppo,
                  trainer.cfg.train.micro_batch_size, trainer.bf16)
    return ro
