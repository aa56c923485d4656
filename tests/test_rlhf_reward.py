"""`method: reward` on the tiny Llama: it learns, it saves a plain sequence-classification
folder, and RewardScorer scores text with the reward model's own tokenizer."""

import json
import random

import pytest
import torch

from conftest import write_jsonl
from ulma.cli import main
from ulma.config import ConfigError, load_config
from ulma.data.prepare import load_split
from ulma.data.schema import pointwise, user_prompt
from rlhf_fixtures import word_tokenizer  # noqa: F401  (a fixture)
from ulma.rlhf.reward import resolve_loss, train_reward, training_pairs
from ulma.scoring import RewardScorer

GOOD = ["Thank you for asking about {t}, happy to help.", "Sure, thank you! {t} is a lovely subject.",
        "Happy to help with {t}, thank you for the question."]
BAD = ["No. {t} is stupid and so are you.", "Go away, I hate {t}.", "Whatever, {t} is dumb."]
TOPICS = ["bread", "cats", "rivers", "chess", "tea", "music", "trains", "stars", "gardens", "paper", "boats", "snow"]


@pytest.fixture
def easy_pairs(tmp_path):
    """48 prompts; the chosen answer is always polite (it says "thank you"), the rejected one rude."""
    rng = random.Random(0)
    rows = []
    for i in range(48):
        topic = rng.choice(TOPICS)
        rows.append({"prompt": f"Please describe {topic} (question {i}).", "chosen": rng.choice(GOOD).format(t=topic),
                     "rejected": rng.choice(BAD).format(t=topic)})
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def tiny_args(model_dir, data, out, *extra):
    return [f"model.name_or_path={model_dir}", "data.train.source=jsonl", f"data.train.path={data}",
            "data.eval_fraction=0.25", "data.eval_limit=null", "data.train.limit=null", "data.max_length=64",
            "train.micro_batch_size=8", "train.grad_accum=1", "train.lr=1e-2", "train.warmup_ratio=0",
            "train.bf16=false", "train.progress=false", f"train.output_dir={out}", "model.lora.r=4",
            "model.lora.dropout=0.0", *extra]


def chat_ids(tokenizer, prompt_text, response):
    """The reward model's input built by hand: chat template + response + EOS."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}], tokenize=False,
                                           add_generation_prompt=True)
    return (tokenizer(prompt, add_special_tokens=False)["input_ids"]
            + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


def test_reward_model_learns_pairs_and_final_loads_with_from_pretrained(tiny_model_dir, easy_pairs, tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    args = tiny_args(tiny_model_dir, easy_pairs, out, "train.max_steps=10")
    assert main(["train", "configs/reward.yaml", *args]) == 0  # the CLI dispatches method.name=reward
    res = json.loads((out / "results.json").read_text())
    assert res["loss"] == "bradley_terry" and res["before"]["pairs"] == 12
    assert res["before"]["pair_accuracy"] <= 0.75  # a random score head
    assert res["after"]["pair_accuracy"] == 1.0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == list(range(1, 11))

    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert not (out / "final" / "adapter_config.json").exists()  # LoRA merged: a plain model folder
    cfg = load_config("configs/reward.yaml", args)
    held_out = load_split(cfg)[1]
    prompts = [e.prompt[-1]["content"] for e in held_out]
    scorer = RewardScorer(out / "final", max_length=64)
    chosen = scorer.score(prompts, [e.chosen for e in held_out])
    rejected = scorer.score(prompts, [e.rejected for e in held_out])
    assert float((chosen > rejected).float().mean()) == res["after"]["pair_accuracy"]
    with torch.no_grad():  # the same numbers from from_pretrained on hand-built ids, one at a time
        by_hand = [model(input_ids=torch.tensor([chat_ids(tokenizer, p, e.chosen)])).logits[0, 0].item()
                   for p, e in zip(prompts, held_out)]
    assert chosen.tolist() == pytest.approx(by_hand, abs=1e-4)


def test_reward_eval_cli_scores_a_data_file(tiny_model_dir, easy_pairs, tmp_path, capsys):
    out = tmp_path / "rm"
    train_reward(load_config("configs/reward.yaml", tiny_args(tiny_model_dir, easy_pairs, out, "train.max_steps=4")))
    assert main(["reward", "eval", str(out / "final"), str(easy_pairs), "--format", "jsonl", "--max-length", "64",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in easy_pairs.read_text().splitlines()]
    scorer = RewardScorer(out / "final", max_length=64)
    chosen = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert report["pairs"] == 48 and report["examples"] == 48
    assert report["pair_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))


def scored_file(tmp_path, levels=(0, 2, 4), binary=False):
    """Per prompt, responses of four clauses, ``k`` of them "thank you kindly" and the rest
    "go away now"; the label is ``k / 4`` (a score), or ``k == 4`` (binary)."""
    rows = []
    for i in range(24):
        for k in levels:
            parts = ["thank you kindly"] * k + ["go away now"] * (4 - k)
            random.Random(i * 10 + k).shuffle(parts)
            rows.append({"prompt": f"Describe {TOPICS[i % 12]} number {i}.", "completion": ", ".join(parts) + ".",
                         "label": (k == 4) if binary else k / 4})
    return write_jsonl(tmp_path / "scores.jsonl", rows)


def test_scores_train_with_mse_and_report_spearman(tiny_model_dir, tmp_path):
    out = tmp_path / "rm"
    res = train_reward(load_config("configs/reward.yaml", tiny_args(tiny_model_dir, scored_file(tmp_path), out,
                                                                    "train.max_steps=12", "train.log_every=5")))
    assert res["loss"] == "mse"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["steps"]) for r in rows if "loss" in r] == [(5, 5), (10, 5), (12, 2)]  # and the last
    before, after = res["before"], res["after"]
    assert before["scored_examples"] == after["scored_examples"] == 18  # 6 held-out prompts x 3 responses
    assert after["spearman"] > 0.8 and after["spearman"] > before["spearman"]
    assert after["pair_accuracy"] > 0.9  # pairs of responses to one prompt with different scores
    assert after["loss"] < before["loss"]
    assert "ece" not in after  # calibration is for binary labels


def test_binary_labels_train_with_cross_entropy_and_report_calibration(tiny_model_dir, tmp_path):
    """Full fine-tuning this time (no LoRA): final/ is the trained model itself."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    data = scored_file(tmp_path, levels=(0, 4), binary=True)
    res = train_reward(load_config("configs/reward.yaml", tiny_args(tiny_model_dir, data, out, "train.max_steps=8",
                                                                    "model.lora.enabled=false", "train.lr=1e-3")))
    assert res["loss"] == "bce"
    before, after = res["before"], res["after"]
    assert after["label_accuracy"] == 1.0 and after["pair_accuracy"] == 1.0
    assert after["log_loss"] < before["log_loss"] and after["brier"] < before["brier"]
    assert after["log_loss"] == pytest.approx(after["loss"], abs=1e-5)  # Eq. 7 averaged = the held-out loss
    assert 0 <= after["ece"] < 0.5
    assert AutoModelForSequenceClassification.from_pretrained(out / "final").config.num_labels == 1


def test_loss_choice_and_pairs_from_scores():
    p1, p2 = user_prompt("a?"), user_prompt("b?")
    scores = [pointwise(p1, "x", 0.5, binary=False), pointwise(p1, "y", 1.0, binary=False),
              pointwise(p2, "z", 0.0, binary=False)]
    assert resolve_loss("auto", scores) == "mse"
    assert resolve_loss("auto", [pointwise(p1, "x", 1, binary=True)]) == "bce"
    pairs = training_pairs(scores)
    assert [(p.chosen, p.rejected) for p in pairs] == [("y", "x")]  # p2 has one response: no pair
    with pytest.raises(ConfigError, match="bradley_terry needs pairs"):
        training_pairs(scores[2:])


def test_reward_scorer_re_tokenises_text_for_a_different_tokenizer(word_tokenizer, tmp_path):
    """A reward model whose tokenizer is not the policy's: it reads text, tokenised its own way."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok, vocab = word_tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(cfg).eval()
    folder = tmp_path / "word-rm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    scores = RewardScorer(folder).score(["tell me about topic 1 please ."], ["good yes"])
    words = "<|im_start|> user : tell me about topic 1 please . <|im_end|> <|im_start|> assistant : good yes <|im_end|>"
    ids = [vocab.index(w) for w in words.split()]  # the word-level vocabulary, by hand
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert scores.tolist() == pytest.approx([expected], abs=1e-6)


def test_unusable_reward_folders_are_named(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RewardScorer(tmp_path / "nowhere")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="LoRA adapter"):
        RewardScorer(adapter)
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="has no tokenizer"):
        RewardScorer(no_tok)


def test_gradient_checkpointing_changes_no_reward_result(tiny_model_dir, tmp_path):
    """train.gradient_checkpointing in the reward loop: the same per-step losses and
    gradient norms as without (activations recomputed in the backward, the same math)."""
    data = scored_file(tmp_path)

    def run(name, *extra):
        from ulma.rlhf.reward import RewardTrainer

        out = tmp_path / name
        trainer = RewardTrainer(load_config("configs/reward.yaml", tiny_args(tiny_model_dir, data, out,
                                                                             "train.max_steps=3", *extra)))
        assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()) == bool(extra)
        trainer.run()
        rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        return [x for r in rows for x in (r["loss"], r["grad_norm"])]

    plain, checkpointed = run("plain"), run("ckpt", "train.gradient_checkpointing=true")
    assert len(plain) == 3 * 2 and plain == pytest.approx(checkpointed, rel=1e-5)


@pytest.mark.parametrize("method,key", [("reward", "train.compile=true"), ("reward", "train.forward_batch_size=4"),
                                        ("rlhf", "train.gradient_checkpointing=true"),
                                        ("rlhf", "train.group_by_length=false"),
                                        ("reward", "train.optimizer_in_backward=true")])
def test_train_keys_a_loop_does_not_use_are_refused(method, key, tmp_path):
    from ulma.config import validate

    cfg = load_config(None, [f"method.name={method}", key, f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"train\.{key.split('.')[1].split('=')[0]}: not used by method '{method}'"):
        validate(cfg)
    validate(load_config(None, [f"method.name={method}", f"train.output_dir={tmp_path}"]))  # the defaults pass


@pytest.mark.parametrize("fused", [True, False])
def test_reward_and_ppo_optimizer_is_fused_adamw_with_the_main_schedule(fused):
    """Every loop's optimizer (ulma.loop.make_optimizer): torch's fused AdamW when
    train.fused_optimizer is on, the per-tensor one when off; linear warmup then cosine, as
    the main loop: lr 1e-3, 10 steps, warmup 0.2 -> steps 0, 1 at 5e-4 and 1e-3, then step s
    at 1e-3 * 0.5 * (1 + cos(pi * (s - 2) / 8))."""
    import math

    from ulma.config import TrainConfig
    from ulma.loop import make_optimizer

    params = [torch.nn.Parameter(torch.ones(3))]
    opt, sched = make_optimizer(params, TrainConfig(lr=1e-3, warmup_ratio=0.2, fused_optimizer=fused), 10)
    assert isinstance(opt, torch.optim.AdamW) and bool(opt.defaults.get("fused")) is fused
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        params[0].grad = torch.ones(3)
        opt.step()
        sched.step()
    expected = [5e-4, 1e-3, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 8))]
    assert lrs == pytest.approx(expected, rel=1e-9)
