"""PPO in two processes (gloo on the CPU, launched with torchrun): each process samples and
scores its share of the rollouts, the shares are gathered into the layout one process would
have built, and the update of two processes is the update of one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from rlhf_fixtures import (fixed_rollout, length_reward, perturb, score, word_policy_dir,  # noqa: F401
                           word_tokenizer)
from test_rlhf_ppo import ppo_args, ppo_cfg
from test_train import metrics
from ulma.rlhf.ppo import PPOTrainer, advantages, merge_rollouts

TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this python")
TESTS = Path(__file__).resolve().parent
# the update: mini-batches of 5 and 3 of the 8 rollouts, in micro-batches of 2 rows a process
# (2 processes: global micro-batches of 4, 1 (process 1 runs a stand-in) and 3 rows)
UPDATE = ["train.micro_batch_size=2", "ppo.rollout_batch=8", "ppo.mini_batch_size=5", "ppo.ppo_epochs=2",
          "ppo.eval_prompts=0", "train.max_steps=1"]
TOKENS = ("logps", "ref_logps", "values", "entropy")

SCRIPT = """
import sys, torch
from rlhf_fixtures import fixed_rollout, length_reward, perturb, score
from test_rlhf_ppo import ppo_cfg
from test_rlhf_ppo_distributed import UPDATE
from ulma.rlhf.ppo import PPOTrainer, advantages, gather_rollouts

model_dir, data, out = sys.argv[1:]
trainer = PPOTrainer(ppo_cfg(model_dir, data, out + "/run", *UPDATE), length_reward)
perturb(trainer)
mine = score(trainer, fixed_rollout(trainer, [[0, 1, 2, 3], [4, 5, 6, 7]][trainer.rank]))
merged = gather_rollouts(mine, trainer.tokenizer.pad_token_id, trainer.world)
whole = score(trainer, fixed_rollout(trainer, range(8)))  # the update's input: the rollout of one process
advantages(whole, trainer.cfg.ppo, trainer.beta)
torch.manual_seed(7)
stats = trainer.update(whole)
params = {n: p.detach().clone() for n, p in trainer.inner.named_parameters() if p.requires_grad}
torch.save({"merged": vars(merged), "stats": stats, "params": params, "world": trainer.world},
           f"{out}/rank{trainer.rank}.pt")
torch.distributed.destroy_process_group()  # gloo's threads must not outlive the interpreter (pytorch#190489)
"""


def _env() -> dict:
    """The processes import this ulma and the test helpers."""
    import ulma

    paths = (str(Path(ulma.__file__).resolve().parents[1]), str(TESTS), os.environ.get("PYTHONPATH"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _prompts(folder: Path) -> Path:
    rows = [{"prompt": f"tell me about topic {i} {j} please .", "completion": "yes", "label": 1}
            for i in range(8) for j in range(5)]
    return write_jsonl(folder / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def two_processes(word_policy_dir, tmp_path_factory):  # noqa: F811
    """What each of 2 processes gathered and updated (rank0.pt, rank1.pt), and the data they ran on."""
    folder = tmp_path_factory.mktemp("ppo-two")
    data = _prompts(folder)
    script = folder / "update.py"
    script.write_text(SCRIPT)
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), str(word_policy_dir),
                        str(data), str(folder)], capture_output=True, text=True, timeout=300, env=_env(), cwd=TESTS.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return data, [torch.load(folder / f"rank{k}.pt", weights_only=False) for k in range(2)]


def _one_process(word_policy_dir, data, out):  # noqa: F811
    trainer = PPOTrainer(ppo_cfg(word_policy_dir, data, out, *UPDATE), length_reward)
    perturb(trainer)
    return trainer


def _same_rollout(a: dict, b, atol: float) -> None:
    """Rollouts ``a`` (fields as a dict) and ``b`` hold the same rows: layout and text exactly,
    per-token tensors to ``atol`` (forwards over different padding widths), scores exactly."""
    for k in ("input_ids", "attention_mask", "mask", "scores"):
        assert torch.equal(a[k], getattr(b, k)), k
    assert (a["prompts"], a["texts"], a["token_ids"]) == (b.prompts, b.texts, b.token_ids)
    for k in TOKENS:
        assert a[k].shape == getattr(b, k).shape and torch.allclose(a[k], getattr(b, k), atol=atol), k


def test_merged_shares_are_the_layout_of_one_process(word_policy_dir, tmp_path):  # noqa: F811
    """Two shares with narrower prompts (rows 0-3) and shorter responses (rows 4-7), scored
    apart and merged, are the rollout of all 8 rows scored at once: prompts left-padded,
    responses right-padded, the per-token numbers unchanged (positions skip the padding)."""
    trainer = _one_process(word_policy_dir, _prompts(tmp_path), tmp_path / "one")
    whole = score(trainer, fixed_rollout(trainer, range(8)))
    shares = [score(trainer, fixed_rollout(trainer, rows)) for rows in ([0, 1, 2, 3], [4, 5, 6, 7])]
    prompt_width = [ro.input_ids.shape[1] - ro.mask.shape[1] for ro in (whole, *shares)]
    response_width = [ro.mask.shape[1] for ro in (whole, *shares)]
    full = len(trainer.prompt_ids[0])
    assert prompt_width == [full, full - 3, full] and response_width == [6, 6, 4]
    assert [int(n) for n in whole.mask.sum(-1)] == [5, 2, 6, 1, 2, 4, 4, 2]  # the stop token counts, not what follows
    assert whole.texts[:3] == ["yes it is good", "no", "w1 w2 w3 w4 w5 w6"] and whole.texts[3] == ""
    assert whole.scores.tolist() == pytest.approx([4 / 6, 1 / 6 - 1, 1.0, 0.0, 1 / 6, 0.5, 0.5 - 1, 1 / 6])
    assert not torch.equal(whole.logps, whole.ref_logps) and whole.values[whole.mask].abs().min() > 0  # perturb's doing
    _same_rollout(vars(merge_rollouts(shares, trainer.tokenizer.pad_token_id)), whole, atol=1e-5)


@needs_torchrun
def test_two_processes_gather_the_rollout_of_one(two_processes, word_policy_dir, tmp_path):  # noqa: F811
    """Process 0 samples rows 0-3, process 1 rows 4-7 (other widths): after the all-gather both
    hold the 8-row rollout one process builds."""
    data, ranks = two_processes
    trainer = _one_process(word_policy_dir, data, tmp_path / "one")
    whole = score(trainer, fixed_rollout(trainer, range(8)))
    for got in ranks:
        assert got["world"] == 2
        _same_rollout(got["merged"], whole, atol=1e-5)


@needs_torchrun
def test_two_processes_update_like_one(two_processes, word_policy_dir, tmp_path):  # noqa: F811
    """The same rollout and mini-batch order: 2 processes (each its share of every micro-batch,
    DDP averaging the gradients) give 1 process's loss statistics and final parameters."""
    data, ranks = two_processes
    trainer = _one_process(word_policy_dir, data, tmp_path / "one")
    whole = score(trainer, fixed_rollout(trainer, range(8)))
    advantages(whole, trainer.cfg.ppo, trainer.beta)
    before = {n: p.detach().clone() for n, p in trainer.inner.named_parameters() if p.requires_grad}
    torch.manual_seed(7)
    stats = trainer.update(whole)
    after = {n: p.detach() for n, p in trainer.inner.named_parameters() if p.requires_grad}
    assert stats["skipped_updates"] == 0 and stats["clipfrac"] > 0 and stats["value_loss"] > 0
    assert any("value_head" in n for n in after) and any("lora_A" in n for n in after)
    for got in ranks:
        assert got["stats"] == pytest.approx(stats, rel=1e-5, abs=1e-7)
        assert got["params"].keys() == after.keys()
        for n in after:
            assert not torch.equal(after[n], before[n]), n  # every trained tensor moved
            assert torch.allclose(got["params"][n], after[n], atol=1e-5), n


@needs_torchrun
def test_ppo_trains_in_two_processes_and_resumes(word_policy_dir, tiny_model_dir, tokenizer, tmp_path):  # noqa: F811
    """`ulma train --num-processes 2` with method rlhf and a reward model: two steps, evaluations
    on prompts split between the processes, results.json says 2 processes; the run interrupted
    after step 1 and resumed in 2 processes ends where the uninterrupted one does.  7 rollouts
    a step (4 + 3): the processes draw different amounts of noise, so the resumed run matches
    only because each samples from a stream seeded by (seed, step, process), not the run's own
    stream (restored from process 0's checkpoint on both)."""
    from transformers import AutoModelForSequenceClassification

    rm_dir = tmp_path / "rm"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    data, a, b = _prompts(tmp_path), tmp_path / "a", tmp_path / "b"

    def launch(out, *extra):
        args = ppo_args(word_policy_dir, data, out, f"ppo.reward_model={rm_dir}", "ppo.reward_max_length=64",
                        "train.max_steps=2", "train.save_every=1", "ppo.rollout_batch=7", "ppo.mini_batch_size=4",
                        "ppo.ppo_epochs=2", "ppo.eval_prompts=5", *extra)
        r = subprocess.run([sys.executable, "-m", "ulma", "train", "--num-processes", "2", "configs/rlhf.yaml", *args],
                           capture_output=True, text=True, timeout=300, env=_env(), cwd=TESTS.parent)
        assert r.returncode == 0, r.stderr[-3000:]

    launch(a)
    results = json.loads((a / "results.json").read_text())
    assert (results["processes"], results["method"], results["steps"]) == (2, "rlhf", 2)
    rows = metrics(a)
    assert [(r["step"], "reward" in r) for r in rows] == [(0, False), (1, True), (2, True), (2, False)]
    assert [r["eval/prompts"] for r in rows if "eval/prompts" in r] == [5, 5]  # 3 + 2, gathered
    assert rows[0]["eval/kl"] == 0.0 and rows[1]["kl"] == 0.0  # LoRA's B is 0: the policy is the reference
    assert rows[2]["kl"] != 0.0 and results["before"]["kl"] == 0.0

    shutil.copytree(a, b)  # ... the same run, interrupted after step 1
    shutil.rmtree(b / "final")
    shutil.rmtree(b / "checkpoints" / "step-000002")
    (b / "results.json").unlink()
    launch(b, "train.resume=true")
    assert [r["step"] for r in metrics(b)] == [0, 1, 2, 2]
    keys = ("reward", "kl", "policy_loss", "value_loss", "eval/reward")
    for ra, rb in zip(rows, metrics(b)):
        assert {k: rb[k] for k in keys if k in rb} == pytest.approx({k: ra[k] for k in keys if k in ra}, rel=1e-5)
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        wa, wb = load_file(str(a / "final" / name)), load_file(str(b / "final" / name))
        assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), name
