"""`method: rlhf` (PPO) on a tiny Llama with a word-level vocabulary: a reward that is a known
function of the generated tokens goes up, the KL to the reference starts at exactly 0 and
stays finite, long prompts are cut from the left and counted, and a reward model with
another tokenizer scores the decoded text."""

import json

import pytest
import torch

from conftest import write_jsonl
from rlhf_fixtures import word_policy_dir, word_tokenizer  # noqa: F401  (fixtures)
from ulma.config import load_config
from ulma.data.schema import user_prompt
from ulma.rlhf import losses as RL
from ulma.rlhf.ppo import PPOTrainer, encode_prompts, sample
from ulma.trainer import train

LONG = "tell me about " + " ".join(["topic"] * 40) + " please ."


@pytest.fixture
def prompt_file(tmp_path):
    """40 prompts (only prompts matter to PPO) and one far longer than the prompt limit."""
    rows = [{"prompt": f"tell me about topic {i} {j} please .", "completion": "yes", "label": 1}
            for i in range(8) for j in range(5)]
    rows.append({"prompt": LONG, "completion": "yes", "label": 1})
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def ppo_args(model_dir, data, out, *extra) -> list[str]:
    """The overrides of configs/rlhf.yaml the PPO tests run with."""
    return [f"model.name_or_path={model_dir}", "data.train.source=jsonl", f"data.train.path={data}",
            "data.eval_fraction=0.2", "data.max_length=32", "train.micro_batch_size=16", "train.lr=1e-2",
            "train.warmup_ratio=0", "train.bf16=false", "train.progress=false", f"train.output_dir={out}",
            "model.lora.r=4", "model.lora.dropout=0.0", "ppo.rollout_batch=16", "ppo.mini_batch_size=8",
            "ppo.ppo_epochs=4", "ppo.max_new_tokens=6", "ppo.eval_prompts=8", *extra]


def ppo_cfg(model_dir, data, out, *extra):
    return load_config("configs/rlhf.yaml", ppo_args(model_dir, data, out, *extra))


def test_long_prompts_are_cut_from_the_left_and_counted(word_tokenizer):  # noqa: F811
    tok, vocab = word_tokenizer
    long, short = user_prompt(LONG), user_prompt("tell me about topic 3 please .")
    full = tok(tok.apply_chat_template(list(long), tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    ids, cut = encode_prompts(tok, [long, short], limit=20)
    assert cut == [True, False]
    assert ids[0] == full[-20:]  # the end survives: the last words and the assistant's turn
    assert [vocab[i] for i in ids[0][-7:]] == ["topic", "please", ".", "<|im_end|>", "<|im_start|>", "assistant", ":"]
    # <|im_start|> user : tell me about topic 3 please . <|im_end|> <|im_start|> assistant :  -- 14 tokens, whole
    assert [vocab[i] for i in ids[1]] == ["<|im_start|>", "user", ":", "tell", "me", "about", "topic", "3", "please",
                                          ".", "<|im_end|>", "<|im_start|>", "assistant", ":"]


def pick_target(trainer) -> tuple[int, float]:
    """The chosen token: the one the initial policy samples most often among those it samples
    in at most 20% of positions (seen in a few rollouts, with room to rise)."""
    with torch.random.fork_rng():
        torch.manual_seed(123)
        ro = sample(trainer.policy, trainer.tokenizer, trainer.prompts, trainer.prompt_ids, trainer.cfg.ppo, False)
    values, counts = torch.tensor([t for ids in ro.token_ids for t in ids]).unique(return_counts=True)
    share = counts / counts.sum()
    ok = share <= 0.2
    return int(values[ok][share[ok].argmax()]), float(share[ok].max())


def test_ppo_raises_the_reward_of_a_chosen_token_and_keeps_kl_finite(word_policy_dir, prompt_file, tmp_path):  # noqa: F811
    out = tmp_path / "ppo"
    target = []

    def reward(prompts, texts, token_ids):  # the fraction of generated tokens equal to the chosen one
        return torch.tensor([sum(t == target[0] for t in ids) / max(len(ids), 1) for ids in token_ids])

    trainer = PPOTrainer(ppo_cfg(word_policy_dir, prompt_file, out, "train.max_steps=5", "train.seed=1"), reward)
    chosen, initial_share = pick_target(trainer)
    target.append(chosen)
    assert 0.02 < initial_share <= 0.2
    res = trainer.run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    for key in ("reward", "kl", "entropy", "clipfrac", "value_loss", "policy_loss", "approx_kl", "response_length"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in steps), key
    assert steps[0]["kl"] == 0.0  # the first rollout: LoRA's B is 0, the policy IS the reference
    assert steps[-1]["kl"] > 0.0 and steps[-1]["clipfrac"] >= 0.0
    first, last = steps[0]["reward"], sum(r["reward"] for r in steps[-2:]) / 2
    assert last > first + 0.3, [r["reward"] for r in steps]
    before, after = res["before"], res["after"]  # the same held-out prompts and sampling seed
    assert before["kl"] == 0.0 and after["reward"] > before["reward"] + 0.3
    assert (out / "final" / "value_head.safetensors").exists() and (out / "final" / "adapter_config.json").exists()
    assert res["data"]["prompts_truncated"] + res["data"]["eval_prompts_truncated"] == 1  # the one long prompt


def test_kl_is_zero_when_the_policy_is_the_reference(word_policy_dir, prompt_file, tmp_path):  # noqa: F811
    """Full fine-tuning: the reference is a frozen copy; before any update both give the same log-probs."""
    def reward(prompts, texts, token_ids):
        return torch.zeros(len(texts))

    trainer = PPOTrainer(ppo_cfg(word_policy_dir, prompt_file, tmp_path / "full", "model.lora.enabled=false",
                                 "train.max_steps=1"), reward)
    ro = trainer.rollout(list(range(8)), trainer.prompts, trainer.prompt_ids)
    assert torch.equal(ro.logps, ro.ref_logps) and ro.mask.any()
    assert RL.kl_penalty(ro.logps, ro.ref_logps, "k3").abs().max().item() == 0.0
    assert ro.stats["kl"] == 0.0


def test_rlhf_with_a_reward_model_of_another_tokenizer(word_policy_dir, prompt_file, tiny_model_dir, tokenizer,  # noqa: F811
                                                       tmp_path):
    """The policy speaks the word vocabulary; the reward model is a SmolLM2-tokenizer model:
    scores come from the decoded text, re-tokenised by the reward model's tokenizer."""
    from transformers import AutoModelForSequenceClassification

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    out = tmp_path / "ppo"
    cfg = ppo_cfg(word_policy_dir, prompt_file, out, f"ppo.reward_model={rm_dir}", "train.max_steps=1",
                  "ppo.eval_prompts=0", "ppo.reward_max_length=64")
    trainer = PPOTrainer(cfg)
    ro = trainer.rollout(list(range(4)), trainer.prompts, trainer.prompt_ids)
    rm.eval()
    for prompt, text, score in zip(ro.prompts, ro.texts, ro.scores):
        chat = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(chat, add_special_tokens=False)["input_ids"] + tokenizer(text, add_special_tokens=False)[
            "input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            assert rm(input_ids=torch.tensor([ids])).logits[0, 0].item() == pytest.approx(score.item(), abs=1e-5)
    res = train(cfg)  # dispatch through ulma.trainer.train, as `ulma train configs/rlhf.yaml` does
    assert res["method"] == "rlhf" and res["steps"] == 1 and (out / "final" / "value_head.safetensors").exists()


def test_resumed_ppo_run_ends_where_the_uninterrupted_one_does(word_policy_dir, prompt_file, tmp_path):  # noqa: F811
    """Checkpoints hold the adapter, the value head, the optimizer and the RNG (sampling included)."""
    import shutil

    from safetensors.torch import load_file

    def reward(prompts, texts, token_ids):
        return torch.tensor([len(ids) / 6 for ids in token_ids])

    extra = ["train.max_steps=2", "train.save_every=1", "ppo.rollout_batch=8", "ppo.mini_batch_size=4",
             "ppo.ppo_epochs=2", "ppo.eval_prompts=0"]
    a, b = tmp_path / "a", tmp_path / "b"
    PPOTrainer(ppo_cfg(word_policy_dir, prompt_file, a, *extra), reward).run()
    PPOTrainer(ppo_cfg(word_policy_dir, prompt_file, b, *extra), reward).run()
    shutil.rmtree(b / "final")  # interrupted after step 1: resume from checkpoints/step-000001
    shutil.rmtree(b / "checkpoints" / "step-000002")
    PPOTrainer(ppo_cfg(word_policy_dir, prompt_file, b, *extra, "train.resume=true"), reward).run()
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        wa, wb = load_file(str(a / "final" / name)), load_file(str(b / "final" / name))
        assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), name
    rows_a = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2]
    assert [r["reward"] for r in rows_a] == pytest.approx([r["reward"] for r in rows_b])


def test_bad_rlhf_settings_are_named():
    from ulma.config import ConfigError, validate

    validate(load_config("configs/rlhf.yaml"))  # the example validates
    with pytest.raises(ConfigError, match=r"ppo.mini_batch_size: must be in \[1, ppo.rollout_batch\]"):
        validate(load_config("configs/rlhf.yaml", ["ppo.mini_batch_size=32"]))
    with pytest.raises(ConfigError, match="ppo.max_new_tokens: leaves fewer than 8 prompt tokens"):
        validate(load_config("configs/rlhf.yaml", ["ppo.max_new_tokens=155"]))
    with pytest.raises(ConfigError, match="unknown key ppo.'clip'"):
        load_config("configs/rlhf.yaml", ["ppo.clip=0.1"])
    with pytest.raises(ConfigError, match="ppo.reward_model: method rlhf needs a reward model folder"):
        PPOTrainer(load_config("configs/rlhf.yaml", ["ppo.reward_model=null"]))


def test_frozen_weights_in_bf16_change_no_ppo_result(word_policy_dir, prompt_file, tiny_model_dir, tokenizer,  # noqa: F811
                                                     tmp_path):
    """train.bf16_frozen_weights under PPO: LoRA's frozen base (and a full fine-tuning
    reference copy, and the reward model) stored in bf16 give the same rollouts, rewards and
    update statistics bit for bit -- every forward runs under bf16 autocast, which cast those
    weights to bf16 for each product anyway."""
    from transformers import AutoModelForSequenceClassification

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)

    def run(name, *extra):
        cfg = ppo_cfg(word_policy_dir, prompt_file, tmp_path / name, "train.bf16=true", "train.max_steps=1",
                      "ppo.eval_prompts=0", f"ppo.reward_model={rm_dir}", "ppo.reward_max_length=64", *extra)
        trainer = PPOTrainer(cfg)
        return trainer, trainer.train_step(0)

    for extra in ((), ("model.lora.enabled=false",)):
        on, s_on = run("on" + str(len(extra)), *extra)
        off, s_off = run("off" + str(len(extra)), *extra, "train.bf16_frozen_weights=false")
        assert s_on == s_off and s_on["reward"] == s_off["reward"]
        nets = [on.policy, on.reward.model] + ([on.reference.copy] if extra else [])
        halves = [sum(p.dtype == torch.bfloat16 for p in net.parameters()) for net in nets]
        # the policy: 7 Linears a layer x 2 layers under LoRA, none in full fine-tuning (all trained);
        # the reference copy 14; the reward model 14 + its score head
        assert halves == ([0, 15, 14] if extra else [14, 15])
        assert all(p.dtype == torch.float32 for net in (off.policy, off.reward.model) for p in net.parameters())
