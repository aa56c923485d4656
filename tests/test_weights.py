"""Per-example ``weight``: from the file to the step's weighted mean.

Hand-worked: group_mean with weights w is, per group, sum(w * loss) / sum(w).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from ulma.data.schema import DataError, as_kind, pair, user_prompt
from ulma.data.sources import load_source
from ulma.data.tokenize import Tokenizer, build_units, collate
from ulma.losses import group_mean, weighted


def test_weights_2_and_0_give_the_loss_of_the_first_example_alone():
    losses, pos = torch.tensor([4.0, 6.0]), torch.tensor([True, True])
    # (2*4 + 0*6) / (2 + 0) = 4
    assert group_mean(losses, pos, n_pos=2.0, n_neg=0.0, weights=torch.tensor([2.0, 0.0])).item() == 4.0
    assert group_mean(losses[:1], pos[:1], n_pos=1, n_neg=0).item() == 4.0


def test_weighted_balanced_and_plain_means_by_hand():
    losses = torch.tensor([1.0, 3.0, 2.0, 5.0])
    pos = torch.tensor([True, True, False, False])
    w = torch.tensor([1.0, 3.0, 0.5, 1.5])
    # positives: (1*1 + 3*3) / 4 = 2.5; negatives: (0.5*2 + 1.5*5) / 2 = 8.5 / 2 = 4.25
    assert group_mean(losses, pos, n_pos=4.0, n_neg=2.0, weights=w).item() == 6.75
    # one weighted mean over all: (10 + 8.5) / 6 = 18.5 / 6
    assert group_mean(losses, pos, n_pos=4.0, n_neg=2.0, weights=w, balance=False).item() == pytest.approx(18.5 / 6)


def test_all_weights_one_is_bit_identical_to_no_weights():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(7, generator=g, requires_grad=True)
    pos = torch.tensor([True, False, True, True, False, False, True])
    plain = group_mean(losses, pos, n_pos=4, n_neg=3, pos_weight=1.5, neg_weight=0.5)
    ones = group_mean(losses, pos, n_pos=4.0, n_neg=3.0, pos_weight=1.5, neg_weight=0.5, weights=torch.ones(7))
    assert torch.equal(plain, ones)
    (g1,) = torch.autograd.grad(plain, losses)
    (g2,) = torch.autograd.grad(ones, losses)
    assert torch.equal(g1, g2)


def test_a_weight_0_example_with_an_infinite_loss_counts_for_nothing():
    losses = torch.tensor([2.0, float("inf")], requires_grad=True)
    out = group_mean(losses, torch.tensor([True, True]), n_pos=1.0, n_neg=0.0, weights=torch.tensor([1.0, 0.0]))
    assert out.item() == 2.0
    assert weighted(torch.tensor([float("nan"), 3.0]), torch.tensor([0.0, 2.0])).tolist() == [0.0, 6.0]


def test_the_weight_column_reaches_the_batch(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "w.jsonl", [
        {"prompt": "Hi", "completion": "Hello.", "label": 1, "weight": 2},
        {"prompt": "Hi", "completion": "Go away.", "label": 0, "weight": 0.25},
        {"prompt": "Hey", "completion": "Hello.", "label": 0, "weight": None},  # null: 1
        {"prompt": "Hey", "completion": "Hi.", "label": 1},  # absent: 1
    ])
    ex = load_source("jsonl", path).examples
    assert [e.weight for e in ex] == [2.0, 0.25, 1.0, 1.0]
    units = build_units(ex, Tokenizer(tokenizer, 64))
    assert units.weights == [2.0, 0.25, 1.0, 1.0]
    assert units.group_weights(range(4)) == (3.0, 1.25)  # positives 2 + 1, negatives 0.25 + 1
    assert collate(units, [1, 0], tokenizer.pad_token_id)["weight"].tolist() == [0.25, 2.0]


def test_weights_survive_conversions_and_csv(tmp_path):
    [chosen, rejected] = as_kind([pair(user_prompt("q"), "good", "bad", weight=3)], "pointwise")
    assert (chosen.weight, rejected.weight) == (3.0, 3.0)
    [demo] = as_kind([chosen, rejected], "demonstration")
    assert (demo.response, demo.weight) == ("good", 3.0)
    csv = tmp_path / "d.csv"
    csv.write_text("text,w\nthe cat,0.5\nthe dog,\n")
    assert [e.weight for e in load_source("csv", csv, columns={"weight": "w"}).examples] == [0.5, 1.0]
    # a DataFrame's missing cell is NaN: 1, like null
    from ulma.data.sources.generic import load_records

    rows = [{"text": "the cat", "weight": 2.0}, {"text": "the dog", "weight": float("nan")}]
    assert [e.weight for e in load_records(rows).examples] == [2.0, 1.0]


@pytest.mark.parametrize("weight, message", [
    (-1, "must be a finite number >= 0, got -1"),
    ("heavy", "must be a number >= 0, got 'heavy'"),
    (True, "must be a number >= 0, got True"),
    (float("inf"), "must be a finite number >= 0, got inf"),
])
def test_bad_weights_name_file_row_and_field(tmp_path, weight, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b", "weight": weight}) + "\n")
    with pytest.raises(DataError) as err:
        load_source("jsonl", path)
    assert (err.value.file, err.value.row, err.value.field) == (str(path), 2, "weight")
    assert err.value.message == message


def test_a_step_on_weights_2_and_0_is_a_step_on_the_first_example_alone(tiny_model_dir, tmp_path):
    """SFT, one step of one micro-batch: the loss and the update of {a: 2, b: 0} equal those of {a}."""
    from test_train import metrics, tiny_cfg
    from ulma.trainer import train

    a = {"prompt": "How do I bake bread?", "completion": "Mix flour, water and yeast, then bake."}
    b = {"prompt": "Tell me a joke.", "completion": "No."}
    held_out = write_jsonl(tmp_path / "eval.jsonl", [a])
    runs = {}
    for name, rows in [("weighted", [{**a, "weight": 2}, {**b, "weight": 0}]), ("alone", [a])]:
        out = tmp_path / name
        train(tiny_cfg(tiny_model_dir, write_jsonl(tmp_path / f"{name}.jsonl", rows), out, "method.name=sft",
                       "train.max_steps=1", "train.grad_accum=1", "train.micro_batch_size=2",
                       "data.eval.source=jsonl", f"data.eval.path={held_out}"))
        runs[name] = ([r["loss"] for r in metrics(out) if "loss" in r][0],
                      load_file(str(out / "final" / "adapter_model.safetensors")))
    (loss_w, weights_w), (loss_a, weights_a) = runs["weighted"], runs["alone"]
    assert loss_w == pytest.approx(loss_a, rel=1e-6)
    assert loss_a > 0
    for k in weights_a:
        torch.testing.assert_close(weights_w[k], weights_a[k], rtol=1e-5, atol=1e-6)


def test_reward_model_steps_weigh_pairs_too(tiny_model_dir, tmp_path):
    """Bradley-Terry on {a: 2, b: 0} takes the step (loss, gradient norm) of {a} alone."""
    from ulma.config import load_config
    from ulma.rlhf.reward import RewardTrainer

    a = {"prompt": "Describe tea.", "chosen": "Thank you, tea is lovely.", "rejected": "No. Go away."}
    b = {"prompt": "Describe snow.", "chosen": "Happy to help: snow is cold.", "rejected": "Whatever."}
    held_out = write_jsonl(tmp_path / "eval.jsonl", [a])
    rows = {}
    for name, data in [("weighted", [{**a, "weight": 2}, {**b, "weight": 0}]), ("alone", [a])]:
        out = tmp_path / name
        trainer = RewardTrainer(load_config("configs/reward.yaml", [
            f"model.name_or_path={tiny_model_dir}", "data.train.source=jsonl",
            f"data.train.path={write_jsonl(tmp_path / f'{name}.jsonl', data)}", "data.eval.source=jsonl",
            f"data.eval.path={held_out}", "data.max_length=64", "train.micro_batch_size=2", "train.grad_accum=1",
            "train.max_steps=1", "train.bf16=false", "train.progress=false", f"train.output_dir={out}",
            "model.lora.r=4", "model.lora.dropout=0.0"]))
        rows[name] = trainer.train_step(0)
    assert rows["weighted"]["loss"] == pytest.approx(rows["alone"]["loss"], rel=1e-6)
    assert rows["weighted"]["grad_norm"] == pytest.approx(rows["alone"]["grad_norm"], rel=1e-5)
