"""{"text"} rows: plain text, a demonstration with an empty prompt, trained on every token.

Tokenizers from tests/chat_tokenizers.py: the=27, " "=6, cat=28, sat=29, "."=30; Gemma's
<bos>=2 and <eos>=1 (its plain encoding adds BOS), ChatML's <|endoftext|>=0 (no BOS).
"""

import json

import pytest
import torch

from chat_tokenizers import make_chat_tokenizer
from conftest import sequence_logps, write_jsonl
from ulma.data.schema import DataError, Demonstration, as_kind, demonstration
from ulma.data.sources import load_source, split_by_prompt
from ulma.data.tokenize import Tokenizer, build_units, collate


def test_a_text_row_is_a_demonstration_with_an_empty_prompt(tmp_path):
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "the cat sat."}, {"text": "the cat."}])
    res = load_source("jsonl", path)
    assert res.stats == {"kind": "demonstration"}
    assert res.examples == [Demonstration((), "the cat sat.", f"{path}:1"), Demonstration((), "the cat.", f"{path}:2")]
    # a mapped column, a CSV cell that looks like JSON stays text
    csv = tmp_path / "lm.csv"
    csv.write_text('body\n"[{""a"": 1}]"\n')
    assert load_source("csv", csv, columns={"text": "body"}).examples == [Demonstration((), '[{"a": 1}]', f"{csv}:2")]


def test_a_row_with_a_prompt_is_read_from_the_prompt_not_the_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": "Hello", "text": "Hi Hello"}])
    [d] = load_source("jsonl", path).examples
    assert (d.prompt, d.response) == (({"role": "user", "content": "Hi"},), "Hello")


@pytest.mark.parametrize("row, bad_row, message", [
    ({"text": "  "}, 2, "the text is empty"),
    ({"text": 3}, 2, "must be a string, got int"),
    # a label anywhere makes the file labelled data: its first text row is the bad one
    ({"prompt": "Hi", "completion": "Hello", "label": 1}, 1, "a text row is a demonstration"),
])
def test_bad_text_rows_name_file_row_and_field(tmp_path, row, bad_row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "the cat sat."}, row])
    with pytest.raises(DataError) as err:
        load_source("jsonl", path)
    assert (err.value.file, err.value.row, err.value.field) == (str(path), bad_row, "text")
    assert message in err.value.message


@pytest.mark.parametrize("family, ids, n_prompt", [
    ("gemma", [2, 27, 6, 28, 6, 29, 30, 1], 1),  # <bos> the cat sat . <eos>: no <start_of_turn>, no <end_of_turn>
    ("chatml", [27, 6, 28, 6, 29, 30, 0], 0),  # no BOS: the cat sat . <|endoftext|>
])
def test_text_is_tokenized_without_the_template_and_scored_on_every_token(tmp_path, family, ids, n_prompt):
    tokenizer = make_chat_tokenizer(tmp_path, family)
    units = build_units([Demonstration((), "the cat sat.")], Tokenizer(tokenizer, max_length=64))
    batch = collate(units, [0], pad_id=3)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["loss_mask"][0].tolist() == [False] * n_prompt + [True] * (len(ids) - n_prompt)
    # every token after the first is predicted: 7 with Gemma's BOS in front, 6 without one
    logits = torch.zeros(1, len(ids), len(tokenizer))  # uniform: log p = -log V for each token
    total, count = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    assert count.tolist() == [len(ids) - 1]
    assert total.item() == pytest.approx(-(len(ids) - 1) * torch.log(torch.tensor(float(len(tokenizer)))).item())


def test_text_rows_split_one_by_one_and_convert_to_every_kind():
    ex = [Demonstration((), f"the cat {i}.") for i in range(4)] + [demonstration([{"role": "user", "content": "Hi"}], "Hello")]
    train, test = split_by_prompt(ex, 0.5, seed=0)
    assert len(test) == 2 and len(train) == 3  # 5 groups: each text is its own
    [pw] = as_kind(ex[:1], "pointwise")
    assert (pw.prompt, pw.response, pw.label) == ((), "the cat 0.", 1.0)


def test_sft_trains_on_a_text_file(tiny_model_dir, tmp_path):
    from test_train import metrics, tiny_cfg
    from ulma.trainer import train

    rows = [{"text": f"Bread number {i} is made of flour, water and yeast."} for i in range(8)]
    path = write_jsonl(tmp_path / "text.jsonl", rows)
    out = tmp_path / "run"
    res = train(tiny_cfg(tiny_model_dir, path, out, "method.name=sft", "train.max_steps=3"))
    assert res["data"]["train_units"] == 6 and res["data"]["eval_examples"] == 2
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert res["after"]["perplexity"] < res["before"]["perplexity"]
    assert json.loads((out / "results.json").read_text())["steps"] == 3


def test_in_memory_rows_of_the_python_api_read_text_and_weight():
    from ulma.data.sources.generic import load_records

    res = load_records([{"text": "the cat sat.", "weight": 0.5}, {"text": "the cat."}])
    assert res.examples == [Demonstration((), "the cat sat.", "<rows>:1", 0.5), Demonstration((), "the cat.", "<rows>:2")]


def test_generation_references_leave_text_rows_out():
    from ulma.evaluation.examples import EvalData, references

    hi = demonstration([{"role": "user", "content": "Hi"}], "Hello")
    data = EvalData([Demonstration((), "the cat."), hi, Demonstration((), "the cat sat.")], "d", [], {})
    assert references(data) == [hi]  # nothing to answer in plain text
