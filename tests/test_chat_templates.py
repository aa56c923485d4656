"""The end of a response is the end-of-turn token its chat template writes.

Tokenizers (tests/chat_tokenizers.py): ids 0..4 are each family's special tokens, then
[UNK]=5, " "=6, "\\n"=7, Hi=8, Hello=9, world=10, user=11, assistant=12, model=13, ...,
the=27, cat=28, sat=29, "."=30.
"""

from types import SimpleNamespace

import pytest

from chat_tokenizers import make_chat_tokenizer
from ulma.data.schema import demonstration, user_prompt
from ulma.data.tokenize import Tokenizer, build_units, collate, response_suffix
from ulma.evaluation.generate import stop_ids

# family: (prompt ids of [user "Hi"] with the generation prompt, end-of-turn id, EOS id)
EXPECTED = {
    # <|im_start|>system\nYou are ... Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
    "chatml": ([1, 14, 7, 15, 6, 16, 6, 17, 6, 18, 6, 19, 6, 12, 6, 20, 6, 21, 22, 6, 23, 6, 24, 6, 25, 6, 26, 2, 7,
                1, 11, 7, 8, 2, 7, 1, 12, 7], 2, 0),
    # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n
    "llama3": ([0, 2, 11, 3, 7, 7, 8, 4, 2, 12, 3, 7, 7], 4, 1),
    # <bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n
    "gemma": ([2, 3, 11, 7, 8, 4, 7, 3, 13, 7], 4, 1),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def family(request, tmp_path_factory):
    return request.param, make_chat_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


def test_the_response_ends_with_the_templates_end_of_turn_token_not_eos(family):
    name, tokenizer = family
    prompt_ids, end_of_turn, eos = EXPECTED[name]
    assert end_of_turn != eos  # <|im_end|> / <|eot_id|> / <end_of_turn>, not <|endoftext|> / <|end_of_text|> / <eos>
    tok = Tokenizer(tokenizer, max_length=128)
    assert response_suffix(tokenizer) == [end_of_turn]
    assert tok.encode_prompt(user_prompt("Hi")) == prompt_ids
    # "Hello world" = Hello, " ", world; the newline ChatML and Gemma write after the marker is left out
    assert tok.encode_response("Hello world") == [9, 6, 10, end_of_turn]


def test_a_row_is_the_templates_own_rendering_of_the_conversation(family):
    """prompt + response = apply_chat_template([user, assistant]) up to the end-of-turn token."""
    name, tokenizer = family
    prompt_ids, end_of_turn, _ = EXPECTED[name]
    units = build_units([demonstration([{"role": "user", "content": "Hi"}], "Hello world")], Tokenizer(tokenizer, 128))
    batch = collate(units, [0], tokenizer.pad_token_id)
    assert batch["input_ids"][0].tolist() == prompt_ids + [9, 6, 10, end_of_turn]
    assert batch["input_ids"][0][batch["loss_mask"][0]].tolist() == [9, 6, 10, end_of_turn]
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello world"}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    full = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    trailing = {"chatml": [7], "llama3": [], "gemma": [7]}[name]  # "\n" after <|im_end|> / <end_of_turn>
    assert full == prompt_ids + [9, 6, 10, end_of_turn] + trailing


def test_generation_stops_on_the_end_of_turn_token(family):
    name, tokenizer = family
    _, end_of_turn, eos = EXPECTED[name]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    assert stop_ids(model, tokenizer) == {end_of_turn, eos}


def test_without_a_template_the_response_ends_with_eos(tmp_path):
    tokenizer = make_chat_tokenizer(tmp_path, "llama3", template=False)
    assert response_suffix(tokenizer) == [1]  # <|end_of_text|>
    assert Tokenizer(tokenizer, 64).encode_response("Hello world") == [9, 6, 10, 1]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[1, 4]))
    assert stop_ids(model, tokenizer) == {1, 4}


def test_the_real_smollm2_template_ends_responses_with_im_end(tokenizer):
    assert response_suffix(tokenizer) == [2]  # <|im_end|>, which is also SmolLM2-Instruct's EOS


def test_a_template_that_cannot_render_a_reply_is_a_clear_error(tmp_path):
    tokenizer = make_chat_tokenizer(tmp_path, "gemma")
    tokenizer.chat_template = "{{ raise_exception('no assistant turns here') }}"
    with pytest.raises(ValueError, match="cannot render a user turn and an assistant reply.*no assistant turns"):
        response_suffix(tokenizer)


def test_ppo_rollouts_end_at_the_end_of_turn_token_too(family):
    import torch

    from ulma.data.tokenize import stop_tokens
    from ulma.rlhf.ppo import response_mask

    name, tokenizer = family
    _, end_of_turn, eos = EXPECTED[name]
    assert stop_tokens(tokenizer) == {end_of_turn, eos}
    resp = torch.tensor([[9, end_of_turn, 7, 9], [9, 10, eos, end_of_turn], [9, 10, 9, 10]])
    assert response_mask(resp, stop_tokens(tokenizer)).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
