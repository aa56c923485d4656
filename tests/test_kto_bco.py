"""KTO and BCO (not in the paper) end to end: the mismatched KL rows in the data, the running
mean carried across steps and checkpoints, and a few steps on the tiny Llama lowering the loss.
The losses' own numbers are in test_losses.py."""

import json
import math
import shutil

import pytest
import torch

from conftest import write_jsonl
from test_train import metrics, tiny_cfg
from ulma.config import load_config
from ulma.data.prepare import kl_partners, prepare
from ulma.methods import METHODS, logp_reduction
from ulma.trainer import train


def test_kl_partners_are_seeded_and_never_share_the_prompt():
    """Units 0-5 over prompts a a b b c c: each partner has another prompt, and a seed fixes them."""
    prompts = ["a", "a", "b", "b", "c", "c"]
    p = kl_partners(prompts, seed=0)
    assert p == kl_partners(prompts, seed=0)
    assert all(prompts[j] != prompts[i] for i, j in enumerate(p))
    assert kl_partners(["a"], seed=0) == [0] and kl_partners(["a", "a"], seed=3) == [1, 0]
    # with responses: another prompt AND another text where there is one (x, y) and (x', y) of
    # one response text would make the "mismatched" row a matched one
    responses = ["y", "n", "y", "n", "y", "n"]
    p = kl_partners(prompts, seed=0, responses=responses)
    assert all(prompts[j] != prompts[i] and responses[j] != responses[i] for i, j in enumerate(p))


def test_kto_data_has_one_mismatched_row_per_unit(tokenizer, pointwise_file, tmp_path):
    """12 examples, eval_fraction 0.25 -> 9 train units over 9 distinct prompts and 2 distinct
    responses (so a partner must have the other response): every unit's KL row is its prompt
    with another unit's response, in the table (so the precomputed reference covers it) and
    after the unit's own rows in a batch."""
    from ulma.data.tokenize import collate

    cfg = tiny_cfg("unused", pointwise_file, tmp_path, "method.name=kto")
    data = prepare(cfg, tokenizer, METHODS["kto"])
    units = data.train
    assert len(units.kl_rows) == len(units) == 9
    seqs = units.table.sequences
    for (row,), kl in zip(units.rows, units.kl_rows):
        own, mis = seqs[row], seqs[kl]
        assert mis.input_ids[: mis.n_prompt] == own.input_ids[: own.n_prompt]  # the unit's prompt
        assert kl != row and mis.origin.startswith("kl:")
    assert len(data.eval.units.kl_rows) == len(data.eval.units)
    batch = collate(units, [0, 1, 2], tokenizer.pad_token_id)
    assert batch["rows"].tolist() == [units.rows[i][0] for i in range(3)] + units.kl_rows[:3]
    assert not prepare(cfg, tokenizer, METHODS["ulma"]).train.kl_rows  # only where the method asks


def test_kto_training_lowers_the_loss_from_one_half(tiny_model_dir, pointwise_file, tmp_path):
    """Before training pi = pi_ref, so every logratio and z0 are 0 and every KTO loss is
    1 - sigma(0) = 0.5: the held-out loss starts at exactly 0.5 and a few steps lower it."""
    out = tmp_path / "kto"
    res = train(tiny_cfg(tiny_model_dir, pointwise_file, out, "method.name=kto", "method.balance=false",
                         f"data.eval.source=jsonl", f"data.eval.path={pointwise_file}", "train.max_steps=6"))
    assert res["before"]["loss"] == pytest.approx(0.5, abs=1e-7)
    assert res["after"]["loss"] < 0.5 - 0.02  # 0.468 here (lr 1e-2, 6 steps): the bounded loss moves slowly
    assert res["after"]["label_accuracy"] > 0.5
    steps = [r["loss"] for r in metrics(out) if "loss" in r and "step" in r and r["step"] > 0]
    assert steps[0] == pytest.approx(0.5, abs=1e-6) and steps[-1] < steps[0]


def test_bco_training_lowers_the_loss_and_resumes_with_its_running_mean(tiny_model_dir, pointwise_file, tmp_path):
    """Before training every reward is 0 and delta is 0: each loss is -log sigma(0) = log 2.
    A run interrupted after step 2 and resumed ends where an uninterrupted one does, with the
    same delta (saved in state.json)."""
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ["method.name=bco", "train.save_every=2", "train.max_steps=4", f"data.eval.source=jsonl",
             f"data.eval.path={pointwise_file}"]
    ra = train(tiny_cfg(tiny_model_dir, pointwise_file, a, *extra))
    # balanced (the default): mean over positives + mean over negatives = 2 log 2 = 1.3862943611
    assert ra["before"]["loss"] == pytest.approx(2 * math.log(2), abs=1e-6)
    assert ra["after"]["loss"] < ra["before"]["loss"]
    train(tiny_cfg(tiny_model_dir, pointwise_file, b, *extra))
    saved = json.loads((a / "checkpoints" / "step-000004" / "state.json").read_text())["method_state"]
    assert saved["count"] == 4 * 8 and saved["total"] != 0.0  # 4 steps x 8 units; the rewards moved
    shutil.rmtree(b / "checkpoints" / "step-000004")
    shutil.rmtree(b / "final")
    train(tiny_cfg(tiny_model_dir, pointwise_file, b, *extra, "train.resume=true"))
    assert json.loads((b / "checkpoints" / "step-000004" / "state.json").read_text())["method_state"] == saved
    la = [r["loss"] for r in metrics(a) if "loss" in r and r["step"] > 0 and "eval/loss" not in r]
    lb = [r["loss"] for r in metrics(b) if "loss" in r and r["step"] > 0 and "eval/loss" not in r]
    assert la == pytest.approx(lb, rel=1e-6)


def test_logp_reduction_auto_is_the_authors_choice_per_method():
    """The authors' code: the sum for pair-wise DPO, the mean for the point-wise losses; TRL's
    KTO / BCO sum.  Explicit sum / mean apply to every method as before."""
    cfg = load_config(None, ["method.logp_reduction=auto"]).method
    auto = {name: logp_reduction(METHODS[name], cfg) for name in METHODS}
    assert auto["dpo"] == auto["kto"] == auto["bco"] == "sum"
    assert {auto[n] for n in ("pointwise_dpo", "ulma", "unlearning", "unlikelihood", "positive_dpo",
                              "negative_dpo")} == {"mean"}
    for how in ("sum", "mean"):
        cfg = load_config(None, [f"method.logp_reduction={how}"]).method
        assert {logp_reduction(m, cfg) for m in METHODS.values()} == {how}


def test_kto_live_reference_scores_the_kl_rows_as_the_precomputed_one(tiny_model_dir, pointwise_file, tmp_path):
    """Full fine-tuning with a live reference copy runs pi_ref on each batch's KL rows too:
    the same losses as the reference log-probs precomputed over the table."""
    common = ["method.name=kto", "model.lora.enabled=false", "train.max_steps=2"]
    train(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "live", *common, "model.reference=live"))
    train(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "pre", *common, "model.reference=precompute"))
    ll = [r["loss"] for r in metrics(tmp_path / "live") if "loss" in r]
    lp = [r["loss"] for r in metrics(tmp_path / "pre") if "loss" in r]
    assert len(ll) == 2 and ll == pytest.approx(lp, rel=1e-5)
