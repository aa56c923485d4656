"""Preference accuracy on human pairs: the arithmetic by hand, and the log-probs against a
direct float64 computation with two different models (policy and reference)."""

import copy

import pytest
import torch

from test_eval_perplexity import direct_logp
from ulma.data.schema import Pair, user_prompt
from ulma.evaluation.loading import load_model, resolve_model
from ulma.evaluation.preference import pair_logps, preference_accuracy, write_preference
from ulma.evaluation.report import load_result


def test_accuracy_counts_the_preferred_answers_higher_reward_and_ties_apart():
    policy = {"chosen": [-10.0, -5.0, -3.0, -7.0], "rejected": [-12.0, -4.0, -3.0, -9.0]}
    reference = {"chosen": [-11.0, -5.0, -3.0, -6.0], "rejected": [-11.0, -5.0, -3.0, -9.0]}
    # margins: (1) - (-1) = 2; 0 - 1 = -1; 0 - 0 = 0 (a tie: wrong); (-1) - 0 = -1
    s = preference_accuracy(policy, reference)
    assert (s["accuracy"], s["ties"], s["pairs"], s["mean_margin"]) == (0.25, 0.25, 4, 0.0)
    assert 0.0 <= s["ci"][0] <= 0.25 <= s["ci"][1] <= 1.0
    assert preference_accuracy({"chosen": [], "rejected": []}, {"chosen": [], "rejected": []})["accuracy"] is None


@torch.no_grad()
def test_pair_logps_match_a_direct_computation_and_rank_by_the_implicit_reward(tiny_model_dir, tmp_path):
    reference, tok = load_model(resolve_model(str(tiny_model_dir)))
    policy = copy.deepcopy(reference)
    torch.manual_seed(1)
    for p in policy.parameters():
        p.add_(0.05 * torch.randn_like(p))
    pairs = [Pair(user_prompt("How do I bake bread?"), "Mix flour and water, then bake.", "Burn it."),
             Pair(user_prompt("Name a fruit."), "An apple.", "A rock, which is not a fruit."),
             Pair(user_prompt("Say hi."), "Hello.", "Hello.")]  # the same answer twice: margin 0, a tie
    got = {name: pair_logps(m, tok, pairs, batch_size=2, progress=False)
           for name, m in (("policy", policy), ("reference", reference))}
    direct = {name: {side: [direct_logp(m, tok, p.prompt, getattr(p, side))[0] for p in pairs]
                     for side in ("chosen", "rejected")} for name, m in (("policy", policy), ("reference", reference))}
    for name in got:
        for side in ("chosen", "rejected"):
            assert got[name][side] == pytest.approx(direct[name][side], rel=1e-4)
    margins = [(direct["policy"]["chosen"][i] - direct["reference"]["chosen"][i])
               - (direct["policy"]["rejected"][i] - direct["reference"]["rejected"][i]) for i in range(3)]
    assert margins[2] == 0.0 and margins[0] != 0.0 and margins[1] != 0.0
    summary = write_preference(got["policy"], got["reference"], tmp_path, meta={"method": "ulma", "dataset": "hh",
                                                                                "seed": 0}, about={}, seconds=1.0)
    assert summary["accuracy"] == pytest.approx(sum(m > 0 for m in margins[:2]) / 3)
    assert summary["ties"] == pytest.approx(1 / 3) and summary["pairs"] == 3
    r = load_result(tmp_path)  # what the report reads back
    assert (r.method, r.dataset, r.seed, r.preference) == ("ulma", "hh", 0, summary["accuracy"])


def test_eval_preference_command(tiny_model_dir, tmp_path, capsys):
    import json

    from conftest import write_jsonl
    from ulma.cli import main

    reference, tok = load_model(resolve_model(str(tiny_model_dir)))
    policy = copy.deepcopy(reference)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    rows = [{"prompt": f"Question {i}?", "chosen": f"A careful answer {i}.", "rejected": f"No {i}."} for i in range(5)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = ["eval", "preference", str(tmp_path / "policy"), "--data", str(data), "--out", str(tmp_path / "ev"),
            "--no-progress"]
    assert main(args) == 2  # a full model folder names no reference
    assert "no reference model known (not an adapter, not a run folder); pass --reference" in capsys.readouterr().err
    assert main(args + ["--reference", str(tiny_model_dir), "--max-length", "64"]) == 0
    got = json.loads((tmp_path / "ev/preference.json").read_text())
    with torch.no_grad():
        margins = []
        for r in rows:
            prompt = user_prompt(r["prompt"])
            lp = {n: [direct_logp(m, tok, prompt, r[k])[0] for k in ("chosen", "rejected")]
                  for n, m in (("policy", policy), ("reference", reference))}
            margins.append((lp["policy"][0] - lp["reference"][0]) - (lp["policy"][1] - lp["reference"][1]))
    assert got["pairs"] == 5 and got["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 5)
    assert got["mean_margin"] == pytest.approx(sum(margins) / 5, rel=1e-3, abs=1e-4)
    assert got["meta"]["reference"] == str(tiny_model_dir)
    assert f"over 5 pairs against {tiny_model_dir}" in capsys.readouterr().out
