"""Batched generation and its resumable file, on a tiny random Llama with SmolLM2's tokenizer.

The tiny model of conftest answers "\\n" forever (flat logits), so these tests use one with
sharper random weights whose answers depend on the prompt, and whose EOS row copies a
token it likes, so some answers end at EOS and others at max_new_tokens.
"""

import json

import pytest
import torch

from ulma.data.schema import DataError, Demonstration, user_prompt
from ulma.evaluation.generate import (GenerateConfig, GenerationFiles, cut_at_stop, generate_batch, generate_file,
                                      left_pad, prompt_tokens, read_generations, row_id)
from ulma.evaluation.io import EvalError

PROMPTS = ["Hi", "How do I bake bread number 3 in a big oven?", "What?", "Name a colour.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory, tokenizer):
    """(model, tokenizer) of a 2-layer Llama whose greedy answers vary with the prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.5, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    third = reference_greedy(model, prompt_tokens(tokenizer, [user_prompt("Hi")], 512)[0], 3, set())[2]
    with torch.no_grad():  # EOS now wins wherever that token would have: some answers stop early
        model.lm_head.weight[tokenizer.eos_token_id] = 1.2 * model.lm_head.weight[third]
    return model, tokenizer


@torch.no_grad()
def reference_greedy(model, ids: list[int], max_new: int, stops: set[int]) -> list[int]:
    """A second implementation: one prompt, no padding, no cache, argmax of a full forward per step."""
    ids, new = list(ids), []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt in stops:
            break
        new.append(nxt)
        ids.append(nxt)
    return new


def demos(n=len(PROMPTS)):
    return [Demonstration(user_prompt(p), f"Reference {i}.", f"mem:{i}") for i, p in enumerate(PROMPTS[:n])]


def test_cut_at_stop_and_left_pad():
    assert cut_at_stop([5, 7, 2, 9, 2], {2}) == ([5, 7], True)
    assert cut_at_stop([5, 7], {2}) == ([5, 7], False)
    assert cut_at_stop([2], {2, 3}) == ([], True)
    ids, mask = left_pad([[4, 5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_equals_one_prompt_at_a_time(sharp):
    model, tok = sharp
    ids = prompt_tokens(tok, [user_prompt(p) for p in PROMPTS], 512)
    assert len({len(i) for i in ids}) > 2  # different lengths: left padding is exercised
    outs = generate_batch(model, tok, ids, GenerateConfig(max_new_tokens=6))
    stops = {tok.eos_token_id}
    for prompt_ids, out in zip(ids, outs):
        expected = reference_greedy(model, prompt_ids, 6, stops)
        assert out["tokens"] == expected
        assert out["finish"] == ("eos" if len(expected) < 6 else "length")
        assert out["text"] == tok.decode(expected, skip_special_tokens=True).strip()
    assert {o["finish"] for o in outs} == {"eos", "length"}


def test_sampling_is_reproducible_from_its_seed(sharp):
    model, tok = sharp
    ids = prompt_tokens(tok, [user_prompt(p) for p in PROMPTS[1:3]], 512)
    cfg = GenerateConfig(max_new_tokens=5, do_sample=True, temperature=2.0, top_k=50)
    a, b = (generate_batch(model, tok, ids, cfg, seed=7) for _ in range(2))
    c = generate_batch(model, tok, ids, cfg, seed=8)
    assert [o["tokens"] for o in a] == [o["tokens"] for o in b]
    assert [o["tokens"] for o in a] != [o["tokens"] for o in c]


class Stop(Exception):
    pass


def interrupt_after(rows: int):
    def hook(done):
        if done >= rows:
            raise Stop
    return hook


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_interrupted_run_resumes_without_redoing_rows(sharp, tmp_path):
    model, tok = sharp
    cfg = GenerateConfig(max_new_tokens=4, batch_size=2)
    fresh = generate_file(model, tok, demos(), tmp_path / "a" / "generations.jsonl", cfg, {"model": "m"},
                          progress=False)
    assert (fresh["kept"], fresh["generated"]) == (0, 5)

    path = tmp_path / "b" / "generations.jsonl"
    files = GenerationFiles(path)
    with pytest.raises(Stop):
        generate_file(model, tok, demos(), path, cfg, {"model": "m"}, progress=False, on_batch=interrupt_after(2))
    assert not path.exists() and len(rows_of(files.partial)) == 2  # the final file appears only when complete
    with pytest.raises(EvalError, match="not finished"):
        read_generations(path)
    res = generate_file(model, tok, demos(), path, cfg, {"model": "m"}, progress=False)
    assert (res["kept"], res["generated"], res["rows"]) == (2, 3, 5)
    assert rows_of(path) == rows_of(tmp_path / "a" / "generations.jsonl")  # as if never interrupted
    assert not files.partial.exists() and json.loads(files.meta.read_text())["complete"] is True
    again = generate_file(model, tok, demos(), path, cfg, {"model": "m"}, progress=False)
    assert (again["kept"], again["generated"]) == (5, 0)
    row = rows_of(path)[1]
    assert row["id"] == row_id(user_prompt(PROMPTS[1]), "Reference 1.") and row["index"] == 1
    assert row["prompt"] == [{"role": "user", "content": PROMPTS[1]}] and row["reference"] == "Reference 1."


def test_a_torn_last_line_is_redone_and_a_broken_line_named(sharp, tmp_path):
    model, tok = sharp
    cfg = GenerateConfig(max_new_tokens=3, batch_size=2)
    path = tmp_path / "generations.jsonl"
    partial = GenerationFiles(path).partial
    with pytest.raises(Stop):
        generate_file(model, tok, demos(), path, cfg, {"model": "m"}, progress=False, on_batch=interrupt_after(2))
    good = partial.read_text()
    partial.write_text(good + '{"id": "0123", "resp')  # killed in the middle of a write
    res = generate_file(model, tok, demos(), path, cfg, {"model": "m"}, progress=False)
    assert (res["kept"], res["generated"], res["torn_lines_dropped"]) == (2, 3, 1)

    path2 = tmp_path / "x" / "generations.jsonl"
    with pytest.raises(Stop):
        generate_file(model, tok, demos(), path2, cfg, {"model": "m"}, progress=False, on_batch=interrupt_after(2))
    lines = GenerationFiles(path2).partial.read_text().splitlines()
    GenerationFiles(path2).partial.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(DataError, match=r"generations.jsonl.partial, row 2: invalid JSON"):
        generate_file(model, tok, demos(), path2, cfg, {"model": "m"}, progress=False)
    with pytest.raises(EvalError, match="made with settings.max_new_tokens = 3, not 9"):  # no mixed rows
        generate_file(model, tok, demos(), path2, GenerateConfig(max_new_tokens=9, batch_size=2), {"model": "m"},
                      progress=False)
    with pytest.raises(DataError, match=r"row 1, field 'id': this row's prompt is not in the current data selection"):
        generate_file(model, tok, demos()[2:], path, cfg, {"model": "m"}, progress=False)


def test_read_generations_names_the_broken_row(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"prompt": "Hi", "response": "Hello", "reference": "Hey"}) + "\n"
                 + json.dumps({"prompt": "Yo", "response": "Hello"}) + "\n")
    with pytest.raises(DataError, match=r"mine.jsonl, row 2, field 'reference': missing"):
        read_generations(f)
    rows, meta, skipped = read_generations(f, on_error="skip")
    assert [r["response"] for r in rows] == ["Hello"] and meta == {} and len(skipped) == 1
    assert rows[0]["prompt"] == ({"role": "user", "content": "Hi"},)
