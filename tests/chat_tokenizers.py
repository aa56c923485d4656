"""Tiny word-level tokenizers with the real chat templates and special tokens of three
model families, written to a folder and loaded with ``AutoTokenizer`` (no download).

Every tokenizer has the same vocabulary, so token ids are the same literals in every test:
the family's special tokens first (ids 0..4), then ``WORDS`` (ids 5, 6, ...).  Each
whitespace character is a token of its own (" " = 6, "\\n" = 7).
"""

from __future__ import annotations

import json
from pathlib import Path

# From the public tokenizer_config.json of each model.
SMOLLM2_TEMPLATE = (  # HuggingFaceTB/SmolLM2-135M-Instruct (ChatML)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (  # google/gemma-2-2b-it
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# family: (special tokens, ids 0..4), bos, eos, whether plain encoding adds BOS, template
FAMILIES = {
    # the base models' EOS (<|endoftext|>), not the end-of-turn token: the template decides
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<unused>"],
               "<|im_start|>", "<|endoftext|>", False, SMOLLM2_TEMPLATE),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", True, LLAMA3_TEMPLATE),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              "<bos>", "<eos>", True, GEMMA_TEMPLATE),
}
WORDS = ["[UNK]", " ", "\n", "Hi", "Hello", "world", "user", "assistant", "model", "system", "You", "are", "a",
         "helpful", "AI", "named", "SmolLM", ",", "trained", "by", "Hugging", "Face", "the", "cat", "sat", "."]


def make_chat_tokenizer(folder: Path, family: str, template: bool = True):
    """The family's tokenizer in ``folder`` (``template=False``: a base model without one)."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer

    specials, bos, eos, adds_bos, chat_template = FAMILIES[family]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]"), behavior="isolated")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if adds_bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": specials[0] if family == "gemma" else eos, "model_max_length": 512}
    if template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(folder))
