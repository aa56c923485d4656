"""`ulma eval perplexity` and the model loader (base, LoRA adapter, full checkpoint, run
folder), checked against a direct computation with the full vocabulary in float64."""

import json
import math

import pytest
import torch

from conftest import write_jsonl
from ulma.cli import main
from ulma.config import load_config, to_dict
from ulma.data.schema import Demonstration, make_prompt, user_prompt
from ulma.evaluation.loading import load_model, resolve_model
from ulma.evaluation.perplexity import score_positives


@torch.no_grad()
def direct_logp(model, tok, prompt, response) -> tuple[float, int]:
    """Sum of log p(response tokens + EOS | prompt) from a log-softmax in float64, and the count."""
    text = tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    p = tok(text, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    logits = model(torch.tensor([p + r])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(p) + k - 1, t]) for k, t in enumerate(r)), len(r)


def test_perplexity_is_exp_of_the_mean_token_nll(tiny_model_dir):
    model, tok = load_model(resolve_model(str(tiny_model_dir)))
    demos = [Demonstration(user_prompt("How do I bake bread?"), "Mix flour, water and yeast, then bake."),
             Demonstration(make_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                        {"role": "user", "content": "Name a fruit."}]), "An apple.")]
    summary, rows = score_positives(model, tok, demos, batch_size=2, progress=False)
    direct = [direct_logp(model, tok, d.prompt, d.response) for d in demos]
    total, count = sum(d[0] for d in direct), sum(d[1] for d in direct)
    assert summary["tokens"] == count == 11 + 4  # Mix|flour|,|water|and|yeast|,|then|bake|. + EOS; An|apple|. + EOS
    assert summary["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-5)
    assert [r["tokens"] for r in rows] == [11, 4]
    assert [r["logp"] for r in rows] == pytest.approx([d[0] for d in direct], rel=1e-5)
    assert rows[1]["prompt"][1] == {"role": "assistant", "content": "Hello."}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Three run folders as `ulma train` leaves them: a LoRA adapter, a full model, an unfinished run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("runs")
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 3 != 0} for i in range(12)]
    data = write_jsonl(root / "feedback.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(3)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero; a trained adapter does not
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        full.model.norm.weight.mul_(3.0)
    out = {}
    for name, model in (("adapter", peft), ("full", full)):
        folder = root / name
        model.save_pretrained(folder / "final")
        tok.save_pretrained(folder / "final")
        cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "data.train.source=jsonl",
                                 f"data.train.path={data}", "data.eval_fraction=0.25", "train.seed=3",
                                 f"method.name={'ulma' if name == 'adapter' else 'sft'}"])
        (folder / "results.json").write_text(json.dumps({"config": to_dict(cfg)}))
        out[name] = folder
    unfinished = root / "unfinished" / "checkpoints" / "step-000002"
    full.save_pretrained(unfinished / "model")
    (unfinished / "state.json").write_text("{}")
    out.update(unfinished=root / "unfinished", data=data, adapter_model=peft.eval(), full_model=full.eval(), cfg=cfg)
    return out


def test_loader_handles_base_adapter_full_run_and_checkpoint(runs, tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)).kind == "full"
    spec = resolve_model(str(runs["adapter"]))
    assert (spec.kind, spec.base, spec.run_dir) == ("adapter", str(tiny_model_dir), runs["adapter"])
    assert spec.run_config["method"]["name"] == "ulma"
    assert resolve_model(str(runs["adapter"] / "final")).kind == "adapter"
    assert resolve_model("smollm2-135m-instruct").kind == "name"
    ckpt = runs["unfinished"] / "checkpoints" / "step-000002"
    assert resolve_model(str(ckpt)).folder == str(ckpt / "model")
    ids = torch.tensor([[1, 200, 300, 400, 2]])
    for name in ("adapter", "full"):
        model, tok = load_model(resolve_model(str(runs[name])))
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, runs[f"{name}_model"](ids).logits, atol=1e-5)
    base, _ = load_model(resolve_model(str(tiny_model_dir)))
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, runs["adapter_model"](ids).logits, atol=1e-3)  # the adapter matters


def test_missing_or_unfinished_models_are_clear_errors(runs, tmp_path, capsys):
    nope = str(tmp_path / "nope")
    assert main(["eval", "perplexity", nope, "--data", str(runs["data"]), "--out", str(tmp_path)]) == 2
    assert f"model '{tmp_path / 'nope'}': no such file or folder" in capsys.readouterr().err
    assert main(["eval", "perplexity", str(runs["unfinished"]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no final model" in err and "evaluate a checkpoint instead, e.g. " in err and "step-000002" in err
    assert main(["eval", "perplexity", str(runs["full"] / "final"), "--data", str(tmp_path / "x.jsonl"),
                 "--out", str(tmp_path)]) == 2  # a data file that is not there


def test_cli_perplexity_of_a_run_on_its_held_out_split(runs, tokenizer):
    from ulma.data.prepare import prepare
    from ulma.evaluation.metrics import perplexity, table_logps
    from ulma.methods import METHODS

    assert main(["eval", "perplexity", str(runs["full"]), "--no-progress"]) == 0
    out = runs["full"] / "eval"
    result = json.loads((out / "perplexity.json").read_text())
    rows = [json.loads(line) for line in (out / "logps.jsonl").read_text().splitlines()]
    # the training code's own held-out set for this config (the same split, its positives)
    ev = prepare(runs["cfg"], tokenizer, METHODS["sft"]).eval
    logps = table_logps(runs["full_model"], ev.table, tokenizer.pad_token_id, 4, False, progress=False)
    expected, tokens = perplexity(logps, ev.positive_rows)
    assert (result["examples"], result["tokens"]) == (len(ev.positive_rows), tokens)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["meta"] == {"model": str(runs["full"] / "final"), "run": str(runs["full"]), "method": "sft",
                              "seed": 3, "dataset": "feedback"}
    assert result["ci"][0] <= result["perplexity"] <= result["ci"][1]
    assert len(rows) == result["examples"] and sum(r["tokens"] for r in rows) == tokens



def test_rows_of_one_prompt_run_widest_packed_group_first():
    from ulma.data.tokenize import Sequence, SequenceTable
    from ulma.evaluation.metrics import _longest_first

    # prompt A (5 tokens): responses of 3 and 3 -> packed width 11, longest row 8
    # prompt B (2 tokens): responses of 7 and 6 -> packed width 15, longest row 9
    # prompt C (8 tokens): one response of 2     -> packed width 10, longest row 10
    seqs = [Sequence([1] * 5 + [4] * 3, 5), Sequence([2] * 2 + [4] * 7, 2), Sequence([1] * 5 + [5] * 3, 5),
            Sequence([2] * 2 + [5] * 6, 2), Sequence([3] * 8 + [4] * 2, 8)]
    table = SequenceTable(seqs)
    assert _longest_first(table, [0, 1, 2, 3, 4], by_prompt=True) == [1, 3, 0, 2, 4]
    assert _longest_first(table, [0, 1, 2, 3, 4], by_prompt=False) == [4, 1, 0, 2, 3]


def test_eval_preference_of_a_run_uses_its_base_as_reference(runs, tiny_model_dir, tmp_path, capsys):
    from ulma.data.schema import user_prompt

    out = tmp_path / "ev"
    assert main(["eval", "preference", str(runs["full"]), "--out", str(out), "--no-progress"]) == 2
    assert "no pairs that humans ordered in the data selection" in capsys.readouterr().err  # one answer a prompt
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No idea {i}."} for i in range(4)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert main(["eval", "preference", str(runs["adapter"]), "--data", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    got = json.loads((out / "preference.json").read_text())
    assert got["meta"]["reference"] == str(tiny_model_dir) and got["meta"]["method"] == "ulma"
    base, tok = load_model(resolve_model(str(tiny_model_dir)))
    policy = runs["adapter_model"]
    right = []
    with torch.no_grad():
        for r in rows:
            p = user_prompt(r["prompt"])
            m = [direct_logp(policy, tok, p, r[k])[0] - direct_logp(base, tok, p, r[k])[0] for k in ("chosen", "rejected")]
            right.append(int(m[0] > m[1]))
    assert got["correct"] == right and got["accuracy"] == sum(right) / 4
