"""The training loop end to end on a tiny random Llama with the real SmolLM2 tokenizer."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from ulma.config import load_config
from ulma.methods import METHODS
from ulma.loop import lr_factor
from ulma.trainer import Trainer, train


@pytest.fixture
def pair_file(tmp_path):
    rows = []
    for i in range(8):
        rows.append({"prompt": f"Tell me about topic {i}.", "chosen": "It is a fine topic to learn about.",
                     "rejected": "No. Go away, idiot."})
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def tiny_cfg(model_dir, data_file, out, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"data.train.source=jsonl", f"data.train.path={data_file}",
        "data.eval_fraction=0.25", "data.max_length=64", "train.micro_batch_size=4", "train.grad_accum=2",
        "train.lr=1e-2", "train.warmup_ratio=0", "train.bf16=false", "train.progress=false", "train.max_steps=4",
        f"train.output_dir={out}", "model.lora.r=4", "model.lora.dropout=0.0", *extra,
    ])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 2, 0.0) == 0.5 and lr_factor(1, 10, 2, 0.0) == 1.0
    assert lr_factor(6, 10, 2, 0.0) == pytest.approx(0.5)  # halfway through the decay: (1 + cos(pi/2)) / 2
    assert lr_factor(10, 10, 2, 0.1) == pytest.approx(0.1)


def test_ulma_training_lowers_loss_and_trains_the_adapter(tiny_model_dir, pointwise_file, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, pointwise_file, out, "method.name=ulma", f"data.eval.source=jsonl",
                   f"data.eval.path={pointwise_file}", "train.max_steps=20")
    res = train(cfg)
    assert res["after"]["loss"] < res["before"]["loss"] - 1.0
    assert res["after"]["perplexity"] < res["before"]["perplexity"]
    assert res["before"]["label_accuracy"] == 0.0  # policy == reference: every reward is exactly 0
    # 20 steps: after 6-12 the rewards of this tiny model still share one sign (accuracy 0.5)
    # in some data orders (the heaviest micro-batch first is one)
    assert res["after"]["label_accuracy"] > 0.5
    steps = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it moved


def test_checkpoint_loads_with_from_pretrained(tiny_model_dir, pointwise_file, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "run"
    train(tiny_cfg(tiny_model_dir, pointwise_file, out, "train.max_steps=1"))
    model = AutoPeftModelForCausalLM.from_pretrained(out / "final")
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, model.config.vocab_size)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_takes_a_finite_step(name, tiny_model_dir, pair_file, tmp_path):
    out = tmp_path / name
    res = train(tiny_cfg(tiny_model_dir, pair_file, out, f"method.name={name}", "train.max_steps=1"))
    step = metrics(out)[1]
    assert step["step"] == 1 and torch.isfinite(torch.tensor(step["loss"])) and not step["skipped"]
    assert (out / "final").is_dir() and (out / "results.json").exists()
    assert res["data"]["train_units"] == {"pair": 6, "demonstration": 6, "negative": 6, "positive": 6}.get(
        "pair" if METHODS[name].kind == "pair" else "demonstration" if METHODS[name].kind == "demonstration"
        else METHODS[name].select or "all", 12)


def test_resume_ends_where_the_uninterrupted_run_does(tiny_model_dir, pointwise_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ["train.save_every=2", "train.max_steps=4", "model.lora.dropout=0.1"]
    train(tiny_cfg(tiny_model_dir, pointwise_file, a, *extra))
    train(tiny_cfg(tiny_model_dir, pointwise_file, b, *extra))
    # interrupt b after step 2: drop what came later, then resume
    import shutil

    shutil.rmtree(b / "checkpoints" / "step-000004")
    shutil.rmtree(b / "final")
    train(tiny_cfg(tiny_model_dir, pointwise_file, b, *extra, "train.resume=true"))
    wa = load_file(str(a / "final" / "adapter_model.safetensors"))
    wb = load_file(str(b / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-7), k
    steps_b = [r["step"] for r in metrics(b) if "loss" in r]
    assert steps_b == [1, 2, 3, 4]  # the replayed steps replace the interrupted run's rows
    la = [r["loss"] for r in metrics(a) if "loss" in r]
    lb = [r["loss"] for r in metrics(b) if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-6)


def test_accumulation_equals_one_big_batch(tiny_model_dir, pointwise_file, tmp_path):
    """Balanced means are global over the step: 2 x 4 accumulated == 1 x 8."""
    common = ["method.name=ulma", "train.max_steps=1", "train.group_by_length=false"]
    t1 = Trainer(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "x", *common, "train.micro_batch_size=4", "train.grad_accum=2"))
    t2 = Trainer(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "y", *common, "train.micro_batch_size=8", "train.grad_accum=1"))
    ref1, _ = t1._reference_caches()
    ref2, _ = t2._reference_caches()
    s1, s2 = t1.train_step(0, ref1), t2.train_step(0, ref2)
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5)
    assert s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-4)


def test_full_finetuning_live_reference_equals_precomputed(tiny_model_dir, pointwise_file, tmp_path):
    common = ["method.name=pointwise_dpo", "model.lora.enabled=false", "train.max_steps=2"]
    live = train(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "live", *common, "model.reference=live"))
    pre = train(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "pre", *common, "model.reference=precompute"))
    ll = [r["loss"] for r in metrics(tmp_path / "live") if "loss" in r]
    lp = [r["loss"] for r in metrics(tmp_path / "pre") if "loss" in r]
    assert ll == pytest.approx(lp, rel=1e-5)
    assert live["after"]["perplexity"] == pytest.approx(pre["after"]["perplexity"], rel=1e-5)
    assert (tmp_path / "pre" / "final" / "model.safetensors").exists()


def test_bf16_autocast_step_is_close_to_fp32(tiny_model_dir, pointwise_file, tmp_path):
    """bf16 autocast (fp32 master weights) gives the fp32 loss to bf16 precision."""
    common = ["method.name=ulma", "train.max_steps=1"]
    train(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "fp32", *common, "train.bf16=false"))
    train(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / "bf16", *common, "train.bf16=true"))
    l32 = metrics(tmp_path / "fp32")[1]["loss"]
    l16 = metrics(tmp_path / "bf16")[1]["loss"]
    assert l16 != l32 and l16 == pytest.approx(l32, rel=2e-2)


def test_grouping_by_length_changes_no_result(tiny_model_dir, tmp_path):
    """Length grouping (a speed lever, on by default) only changes which rows share a
    padded micro-batch: a step over the same rows gives the same loss and gradients."""
    rows = []
    for i in range(8):
        words = " ".join(["very"] * (1 + 5 * i))
        rows.append({"prompt": f"Question {i}?", "completion": f"A {words} long answer.", "label": i % 3 != 0})
    data = write_jsonl(tmp_path / "varied.jsonl", rows)
    common = ["method.name=ulma", "train.max_steps=1", "train.micro_batch_size=2", "train.grad_accum=4",
              "data.eval.source=jsonl", f"data.eval.path={data}"]
    steps, plans = [], []
    for grouped in ("true", "false"):
        t = Trainer(tiny_cfg(tiny_model_dir, data, tmp_path / grouped, *common, f"train.group_by_length={grouped}"))
        assert len(t.data.train) == 8  # one step = 4 micro-batches of 2 = every row once
        plans.append(t.plan)
        ref, _ = t._reference_caches()
        steps.append(t.train_step(0, ref))
    assert plans[0] != plans[1]  # the lever did regroup the rows
    assert sorted(i for mb in plans[0] for i in mb) == sorted(i for mb in plans[1] for i in mb) == list(range(8))
    assert steps[0]["loss"] == pytest.approx(steps[1]["loss"], rel=1e-5)
    assert steps[0]["grad_norm"] == pytest.approx(steps[1]["grad_norm"], rel=1e-4)


def test_gradient_checkpointing_changes_no_result(tiny_model_dir, pointwise_file, tmp_path):
    """Recomputing activations in the backward gives the same step (LoRA dropout off)."""
    common = ["method.name=ulma", "train.max_steps=1", "train.group_by_length=false"]
    steps = []
    for on in ("true", "false"):
        t = Trainer(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / on, *common, f"train.gradient_checkpointing={on}"))
        assert t.model.is_gradient_checkpointing == (on == "true")
        ref, _ = t._reference_caches()
        # Which attention kernels each attention call could pick (cuDNN allowed or not).
        # With checkpointing the backward reruns each layer: that rerun must see the
        # forward's flags, or on a GPU the recompute picks cuDNN and torch rejects its
        # differently shaped saved tensors (seen on an H200).
        seen = []
        attn = t.model.base_model.model.model.layers[0].self_attn
        hook = attn.register_forward_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
        steps.append(t.train_step(0, ref))
        hook.remove()
        forwards = 2 * 2  # 2 micro-batches, each run once forward, once more if recomputed
        assert seen == [False] * (forwards if on == "true" else forwards // 2)
    assert steps[0]["loss"] == pytest.approx(steps[1]["loss"], rel=1e-6)
    assert steps[0]["grad_norm"] == pytest.approx(steps[1]["grad_norm"], rel=1e-5)


def test_fused_optimizer_changes_no_result(tiny_model_dir, pointwise_file, tmp_path):
    """torch's fused AdamW (a speed lever, on by default) takes the same steps as the
    per-tensor loop: full fine-tuning, 3 steps, equal losses and weights."""
    common = ["method.name=ulma", "model.lora.enabled=false", "train.max_steps=3", "train.lr=1e-3"]
    for on in ("true", "false"):
        t = Trainer(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / on, *common, f"train.fused_optimizer={on}"))
        assert bool(t.optimizer.param_groups[0]["fused"]) is (on == "true")
        t.run()
    la = [r["loss"] for r in metrics(tmp_path / "true") if "loss" in r]
    lb = [r["loss"] for r in metrics(tmp_path / "false") if "loss" in r]
    assert len(la) == 3 and la == pytest.approx(lb, rel=1e-5)
    assert la[0] != la[2]  # the weights did move
    wa, wb = (load_file(tmp_path / on / "final" / "model.safetensors") for on in ("true", "false"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_shared_prompts_change_no_result(tiny_model_dir, pair_file, tmp_path):
    """Running a pair's prompt once (a speed lever, on by default) takes the same DPO steps as
    running each row whole: reference log-probs, 3 losses and the adapter weights agree."""
    common = ["method.name=dpo", "train.max_steps=3", "train.lr=1e-3", "model.lora.dropout=0.0"]
    refs = []
    for on in ("true", "false"):
        t = Trainer(tiny_cfg(tiny_model_dir, pair_file, tmp_path / on, *common, f"train.share_prompts={on}"))
        refs.append(t._reference_caches()[0])
        if on == "true":  # rows of each model call in step 0 (the heaviest micro-batch first: 4
            seen = []  # pairs, then the short one of 2): packed, one row per pair (8 and 4 unpacked)
            hook = t.model.get_base_model().model.register_forward_pre_hook(
                lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
            t.train_step(0, refs[-1])
            hook.remove()
            assert seen == [4, 2]
            t = Trainer(tiny_cfg(tiny_model_dir, pair_file, tmp_path / on, *common, "train.overwrite=true"))
        t.run()
    assert torch.allclose(refs[0]["sum"], refs[1]["sum"], rtol=1e-5) and torch.equal(refs[0]["count"], refs[1]["count"])
    la = [r["loss"] for r in metrics(tmp_path / "true") if "loss" in r]
    lb = [r["loss"] for r in metrics(tmp_path / "false") if "loss" in r]
    assert len(la) == 3 and la == pytest.approx(lb, rel=1e-4)
    assert la[0] != la[2]  # the weights did move
    wa, wb = (load_file(tmp_path / on / "final" / "adapter_model.safetensors") for on in ("true", "false"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_padding_to_a_multiple_changes_no_result(tiny_model_dir, pair_file, tmp_path):
    """``train.pad_to_multiple_of`` (on by default, against a run's growing memory): widths of
    every model call are multiples of it, and the reference log-probs, 3 DPO losses and the
    adapter weights are those of exact widths (packed prompts on)."""
    common = ["method.name=dpo", "train.max_steps=3", "train.lr=1e-3"]
    refs, widths = [], {}
    for m in ("16", "1"):
        t = Trainer(tiny_cfg(tiny_model_dir, pair_file, tmp_path / m, *common, f"train.pad_to_multiple_of={m}"))
        seen = widths.setdefault(m, [])
        hook = t.model.get_base_model().model.register_forward_pre_hook(
            lambda mod, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
        refs.append(t._reference_caches()[0])
        t.run()
        hook.remove()
    assert widths["16"] and all(w % 16 == 0 for w in widths["16"])
    assert any(w % 16 for w in widths["1"])  # the exact widths are not all multiples already
    assert torch.allclose(refs[0]["sum"], refs[1]["sum"], rtol=1e-5) and torch.equal(refs[0]["count"], refs[1]["count"])
    la, lb = ([r["loss"] for r in metrics(tmp_path / m) if "loss" in r] for m in ("16", "1"))
    assert len(la) == 3 and la == pytest.approx(lb, rel=1e-4) and la[0] != la[2]
    wa, wb = (load_file(tmp_path / m / "final" / "adapter_model.safetensors") for m in ("16", "1"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_frozen_weights_in_bf16_change_no_result(tiny_model_dir, pointwise_file, tmp_path):
    """train.bf16_frozen_weights: under bf16 autocast, LoRA's frozen base Linears (and a live
    reference copy's) are stored in bf16; autocast cast them to bf16 for every product
    anyway, so losses and adapter weights are the same, bit for bit."""
    from ulma.models import is_peft

    def run(name, *extra):
        t = Trainer(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / name, "method.name=ulma", "train.max_steps=2",
                             "train.bf16=true", *extra))
        ref, _ = t._reference_caches()
        losses = [t.train_step(s, ref)["loss"] for s in range(2)]
        return t, losses

    on, l_on = run("on")
    off, l_off = run("off", "train.bf16_frozen_weights=false")
    assert l_on == l_off
    a = {n: p for n, p in on.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in off.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # what is stored in bf16: the 7 Linears of each decoder layer (q, k, v, o, gate, up, down),
    # not the adapters, norms, the embedding or the output layer tied to it
    cfg = on.model.config
    dtypes = {n: p.dtype for n, p in on.model.named_parameters()}
    half = {n for n, d in dtypes.items() if d == torch.bfloat16}
    assert len(half) == 7 * cfg.num_hidden_layers and all(n.endswith("base_layer.weight") or "lora" not in n
                                                         for n in half)
    assert not any("lora_" in n or "norm" in n or "embed" in n for n in half)
    assert all(dtypes[n] == torch.float32 for n in a)
    assert all(p.dtype == torch.float32 for p in off.model.parameters())
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down (no biases)
    bytes_of = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert bytes_of(off.model) - bytes_of(on.model) == 2 * per_layer * cfg.num_hidden_layers
    assert is_peft(on.model)

    # full fine-tuning with a live reference: the frozen copy's Linears in bf16, the policy's not
    full = ["model.lora.enabled=false", "model.reference=live"]
    f_on, lf_on = run("full-on", *full)
    f_off, lf_off = run("full-off", *full, "train.bf16_frozen_weights=false")
    assert lf_on == lf_off
    assert all(p.dtype == torch.float32 for p in f_on.model.parameters())
    assert sum(p.dtype == torch.bfloat16 for p in f_on.reference.copy.parameters()) == 7 * cfg.num_hidden_layers


def test_compiled_lora_layers_see_inputs_that_need_a_gradient_only_where_autograd_records():
    """Under LoRA the embedding is frozen: with train.compile its output is made to need a
    gradient (every layer's input alike: one graph), but not under no_grad (Hugging Face's
    enable_input_require_grads sets it there too, and a no_grad pass then needs two graphs)."""
    from ulma.trainer import _input_requires_grad

    emb = torch.nn.Embedding(5, 3).requires_grad_(False)
    emb.register_forward_hook(_input_requires_grad)
    ids = torch.tensor([[1, 2]])
    assert emb(ids).requires_grad
    with torch.no_grad():
        assert not emb(ids).requires_grad


def test_step_rows_average_windows_by_hand():
    from ulma.loop import StepRows

    rows = StepRows(3, save_every=0, total=4)
    steps = [{"loss": 1.0, "loss_pos": None, "lr": 0.3, "skipped": False, "seconds": 0.5, "step": 1},
             {"loss": 2.0, "loss_pos": 4.0, "lr": 0.2, "skipped": True, "seconds": 0.25, "step": 2},
             {"loss": 6.0, "loss_pos": None, "lr": 0.1, "skipped": True, "seconds": 1.0, "step": 3},
             {"loss": 5.0, "loss_pos": None, "lr": 0.05, "skipped": False, "seconds": 2.0, "step": 4}]
    assert rows.add(steps[0]) is None and rows.add(steps[1]) is None
    assert rows.add(steps[2]) == {"loss": 3.0, "loss_pos": 4.0, "lr": 0.1, "skipped": 2, "seconds": 1.75,
                                  "step": 3, "steps": 3}
    assert rows.add(steps[3]) == {"loss": 5.0, "loss_pos": None, "lr": 0.05, "skipped": 0,
                                            "seconds": 2.0, "step": 4, "steps": 1}
    assert StepRows(1, save_every=0, total=4).add(steps[0]) is steps[0]  # every step's own row, unchanged


def test_log_every_rows_are_means_and_a_resumed_run_writes_the_same(tiny_model_dir, pointwise_file, tmp_path):
    """train.log_every=2 with checkpoints every 3 steps, 5 steps: rows after steps 2, 3
    (a checkpoint), 4 and 5 (the last), each the mean of its steps' losses in a run with
    a row per step; a run stopped after step 3 and resumed writes the same rows."""
    import shutil

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["method.name=ulma", "train.max_steps=5"]
    train(tiny_cfg(tiny_model_dir, pointwise_file, a, *common))
    every = {r["step"]: r for r in metrics(a) if "loss" in r}
    train(tiny_cfg(tiny_model_dir, pointwise_file, b, *common, "train.log_every=2", "train.save_every=3"))
    rows = [r for r in metrics(b) if "loss" in r]
    assert [(r["step"], r["steps"]) for r in rows] == [(2, 2), (3, 1), (4, 1), (5, 1)]
    for r, window in zip(rows, ([1, 2], [3], [4], [5])):
        assert r["loss"] == pytest.approx(sum(every[s]["loss"] for s in window) / len(window), rel=1e-6)
        assert r["lr"] == pytest.approx(every[r["step"]]["lr"])
    shutil.copytree(b, c)  # b stopped after step 3's checkpoint, then resumed
    shutil.rmtree(c / "checkpoints" / "step-000005")
    shutil.rmtree(c / "final")
    (c / "results.json").unlink()
    train(tiny_cfg(tiny_model_dir, pointwise_file, c, *common, "train.log_every=2", "train.save_every=3",
                   "train.resume=true"))
    resumed = [r for r in metrics(c) if "loss" in r]
    assert [r["step"] for r in resumed] == [2, 3, 4, 5]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


@pytest.mark.parametrize("fused,lora", [("true", "false"), ("false", "false"), ("true", "true")])
def test_optimizer_in_backward_takes_the_steps_of_an_unclipped_run(fused, lora, tiny_model_dir, pointwise_file,
                                                                   tmp_path):
    """AdamW applied to each parameter inside the backward (its gradient then freed) makes
    exactly the updates of a step after the whole backward, without clipping: full
    fine-tuning (the output layer tied to the embedding: one update from both of its
    uses) or LoRA's adapters, gradient checkpointing, 3 steps; equal losses, gradient
    norms and weights."""
    common = ["method.name=ulma", f"model.lora.enabled={lora}", "train.max_steps=3", "train.lr=1e-2",
              "train.grad_accum=1", "train.max_grad_norm=0", "train.gradient_checkpointing=true",
              f"train.fused_optimizer={fused}"]
    for on in ("true", "false"):
        t = Trainer(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / on, *common, f"train.optimizer_in_backward={on}"))
        assert (t.in_backward is not None) is (on == "true")
        ref, _ = t._reference_caches()
        t.model.train()
        row = t.train_step(0, ref)
        # in the backward: no gradient is left at the end; otherwise freed by zero_grad too
        assert all(p.grad is None for p in t.model.parameters()) and not row["skipped"]
        t.run()  # resumes nothing: a fresh run of 3 steps from the same start
    ma, mb = metrics(tmp_path / "true"), metrics(tmp_path / "false")
    la, lb = [r["loss"] for r in ma if "loss" in r], [r["loss"] for r in mb if "loss" in r]
    assert len(la) == 3 and la == pytest.approx(lb, rel=1e-6) and la[0] != la[2]
    ga, gb = [r["grad_norm"] for r in ma if "loss" in r], [r["grad_norm"] for r in mb if "loss" in r]
    assert ga == pytest.approx(gb, rel=1e-5) and max(ga) > 1.0  # unclipped: a clip at 1 would have changed the steps
    name = "adapter_model.safetensors" if lora == "true" else "model.safetensors"
    wa, wb = (load_file(tmp_path / on / "final" / name) for on in ("true", "false"))
    assert len(wa) == (2 * 4 * 2 if lora == "true" else len(wa))  # LoRA: A and B of 4 projections x 2 layers
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-7), k


@pytest.mark.parametrize("fused", [True, False])
def test_backward_step_leaves_a_parameter_whose_gradient_is_not_finite(fused):
    """One parameter's gradient is NaN: it and its AdamW step count stay as they were,
    the other takes AdamW's first step, by hand: w - lr * sign(g) (m / sqrt(v) = g / |g|)."""
    from ulma.backward_step import BackwardStep

    a, b = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    opt = torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.0, eps=1e-12, **({"fused": True} if fused else {}))
    hook = BackwardStep(opt, [a, b], fused=fused)
    b.register_hook(lambda g: torch.full_like(g, float("nan")))  # runs before b's gradient is accumulated
    ((a * torch.tensor([2.0, -3.0])).sum() + (b * b).sum()).backward()
    norm, left = hook.finish()
    assert left == 1 and not torch.isfinite(norm)
    assert torch.allclose(a.detach(), torch.tensor([1.0 - 0.1, 2.0 + 0.1]))
    assert torch.equal(b.detach(), torch.tensor([3.0, -4.0]))
    assert a.grad is None and b.grad is None
    assert float(opt.state[a]["step"]) == 1 and float(opt.state.get(b, {}).get("step", 0)) == 0
    hook.remove()


def test_optimizer_in_backward_refuses_what_needs_every_gradient_first(tiny_model_dir, pointwise_file, tmp_path):
    from ulma.config import ConfigError, validate

    def check(*extra):
        validate(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path, *extra))

    check("train.optimizer_in_backward=true", "train.max_grad_norm=0", "train.grad_accum=1")  # passes
    check("train.max_grad_norm=null")  # no clipping, spelled the other way
    with pytest.raises(ConfigError, match="train.optimizer_in_backward: needs train.grad_accum: 1"):
        check("train.optimizer_in_backward=true", "train.max_grad_norm=0")  # tiny_cfg's grad_accum=2
    with pytest.raises(ConfigError, match="train.optimizer_in_backward: needs train.max_grad_norm: 0"):
        check("train.optimizer_in_backward=true", "train.grad_accum=1")  # the default max_grad_norm 1.0
    with pytest.raises(ConfigError, match="train.max_grad_norm: must be > 0, or 0 / null for no clipping"):
        check("train.max_grad_norm=-1")


def test_a_checkpointed_training_forward_keeps_no_autocast_cache(tiny_model_dir):
    """With gradient checkpointing, the training forward runs autocast without its cache
    (the cached casts would outlive the layers that dropped theirs); forwards without
    gradients and unchecked models keep it."""
    from transformers import AutoModelForCausalLM

    from ulma.logprobs import forward_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert forward_cache(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not forward_cache(model)
    with torch.no_grad():
        assert forward_cache(model)


def test_the_checkpointed_bf16_forward_without_cache_or_head_logits_changes_no_result(
        tiny_model_dir, pointwise_file, tmp_path, monkeypatch):
    """Under bf16 autocast with gradient checkpointing the training forward keeps no cache
    of weight casts, and the model's own output layer returns empty logits: both on by
    default. With them switched off (the cache kept, the one-position logits computed) a
    step gives the same loss and gradient norm, bit for bit (the same casts, and the
    logits were never read)."""
    from contextlib import nullcontext

    import ulma.logprobs as lp

    common = ["method.name=ulma", "model.lora.enabled=false", "train.max_steps=1", "train.bf16=true",
              "train.gradient_checkpointing=true"]
    rows = []
    for off in (False, True):
        if off:
            monkeypatch.setattr(lp, "forward_cache", lambda model: True)
            monkeypatch.setattr(lp, "_no_logits", lambda model: nullcontext())
        t = Trainer(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / str(off), *common))
        assert t.bf16
        ref, _ = t._reference_caches()
        t.model.train()
        rows.append(t.train_step(0, ref))
    assert rows[0]["loss"] == rows[1]["loss"] and rows[0]["grad_norm"] == rows[1]["grad_norm"]


def test_lean_activations_change_no_result(tiny_model_dir, pointwise_file, tmp_path):
    """train.lean_activations: silu(gate) recomputed in the backward, LoRA's dropout keeping a
    bool mask: the same losses and trained weights bit for bit (LoRA with dropout, bf16
    autocast; full fine-tuning with a live reference, whose copied MLPs must run the copy's
    weights, not the policy's)."""
    def run(name, *extra):
        t = Trainer(tiny_cfg(tiny_model_dir, pointwise_file, tmp_path / name, "method.name=ulma", "train.max_steps=2",
                             "train.bf16=true", *extra))
        ref, _ = t._reference_caches()
        return t, [t.train_step(s, ref)["loss"] for s in range(2)]

    for mode in (["model.lora.dropout=0.3"], ["model.lora.enabled=false", "model.reference=live"]):
        on, l_on = run("on" + str(len(mode)), *mode)
        off, l_off = run("off" + str(len(mode)), *mode, "train.lean_activations=false")
        assert l_on == l_off
        a = {n: p for n, p in on.model.named_parameters() if p.requires_grad}
        b = {n: p for n, p in off.model.named_parameters() if p.requires_grad}
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        mlps = [m for m in on.model.modules() if type(m).__name__ == "LlamaMLP"]
        assert len(mlps) == 2 and all(m.forward.__func__.__name__ == "_lean_forward" for m in mlps)
        assert all("forward" not in m.__dict__ for m in off.model.modules())
        drops = [type(m).__name__ for m in on.model.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops == (["MaskDropout"] * 4 * 2 if len(mode) == 1 else [])  # q, k, v, o in 2 layers
    copies = [m for m in on.reference.copy.modules() if type(m).__name__ == "LlamaMLP"]
    assert len(copies) == 2 and all(m.forward.__self__ is m for m in copies)
