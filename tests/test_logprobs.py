import math

import pytest
import torch

from conftest import sequence_logps
from ulma.logprobs import logits_to_keep, reduce_logps, token_logps


def test_token_logps_match_a_plain_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    logps, m = token_logps(logits, ids, mask, chunk_rows=2)
    # second implementation: the full float32 log-softmax, position t scores token t+1
    full = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(logps, full * mask[:, 1:], atol=1e-6)
    total, count = sequence_logps(logits, ids, mask)
    assert count.tolist() == [3, 2, 1]
    assert torch.allclose(total, (full * mask[:, 1:]).sum(-1), atol=1e-5)


def test_hand_computed_two_token_vocabulary():
    # logits [0, log 3] -> p = [1/4, 3/4]; the sequence [0, 1, 0] scores tokens 1 then 0
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[False, True, True]])
    total, count = sequence_logps(logits, ids, mask)
    assert math.isclose(total.item(), math.log(3 / 4) + math.log(1 / 4), rel_tol=1e-6)
    assert math.isclose(reduce_logps(total, count, "mean").item(), (math.log(3 / 4) + math.log(1 / 4)) / 2, rel_tol=1e-6)


def test_logits_for_the_last_positions_only_give_the_same_result():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 7)
    ids = torch.randint(0, 7, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    k = logits_to_keep(mask)
    assert k == 4  # first response token at position 3 -> logits from position 2 on
    full_total, _ = sequence_logps(logits, ids, mask)
    part_total, part_count = sequence_logps(logits[:, -k:], ids, mask)
    assert torch.allclose(full_total, part_total) and part_count.tolist() == [2, 2]


# ------------------------------------------------------------------ the fused output layer


@pytest.mark.parametrize("chunks", [(3, 0), (2, 5), (5, 3), (3, 0, 4), (2, 5, 6), (7, 7, 1)])
def test_linear_token_logps_match_log_softmax_values_and_gradients(chunks):
    # (forward rows, backward rows[, vocabulary rows a block]); 0: the forward's rows / the
    # whole vocabulary.  13 columns in blocks of 4: 4 + 4 + 4 + 1; of 6: 6 + 6 + 1; of 1: 13.
    from ulma.logprobs import LinearTokenLogps

    torch.manual_seed(2)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (7,))
    g = torch.randn(7, dtype=torch.float64)
    # second implementation: the full log-softmax over the vocabulary, autograd's gradients
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    gh, gw = torch.autograd.grad((ref * g).sum(), (hidden, weight))
    out = LinearTokenLogps.apply(hidden, weight, targets, *chunks)  # e.g. 3 chunks: 3 + 3 + 1 positions
    fh, fw = torch.autograd.grad((out * g).sum(), (hidden, weight))
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.allclose(fh, gh, atol=1e-10) and torch.allclose(fw, gw, atol=1e-10)


def test_linear_token_logps_under_bf16_autocast_match_the_bf16_products_log_softmax():
    from ulma.logprobs import LinearTokenLogps

    torch.manual_seed(3)
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (9,))
    g = torch.randn(9)
    # second implementation: the bf16 product (as autocast runs the output layer), then a
    # float32 log-softmax over the whole vocabulary, autograd's gradients
    logits = (hidden.bfloat16() @ weight.bfloat16().T).float()
    ref = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    gh, gw = torch.autograd.grad((ref * g).sum(), (hidden, weight))
    for block in (0, 16):  # the whole vocabulary; blocks of 16 + 16 + 8, each cast on its own
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = LinearTokenLogps.apply(hidden, weight, targets, 4, 0, block)
        fh, fw = torch.autograd.grad((out * g).sum(), (hidden, weight))
        assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
        # the backward's matrix products run in bf16 as well: bf16's 3 significant digits
        assert torch.allclose(fh, gh, rtol=2e-2, atol=2e-2) and torch.allclose(fw, gw, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("block", [0, 16])
def test_linear_token_logps_keep_no_cast_copy_of_a_float32_layer_cast_in_blocks(block):
    from ulma.logprobs import LinearTokenLogps

    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(40, 16)  # float32, frozen: a LoRA model's output layer tied to its embedding
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            LinearTokenLogps.apply(hidden, weight, targets := torch.randint(0, 40, (9,)), 4, 0, block).sum().backward()
    kept = {(tuple(t.shape), t.dtype, t.data_ptr() == weight.data_ptr()) for t in saved}
    assert ((9,), torch.int64, False) in kept and targets.shape == (9,)
    if block:  # the stored weight itself (cast again block by block in the backward)
        assert ((40, 16), torch.float32, True) in kept and ((40, 16), torch.bfloat16, False) not in kept
    else:  # one block: its bf16 cast, [40, 16], kept for the backward
        assert ((40, 16), torch.bfloat16, False) in kept and ((40, 16), torch.float32, True) not in kept


def test_head_plan_casts_a_float32_output_layer_in_even_blocks_of_at_most_24_mib():
    from ulma.logprobs import head_plan

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    smollm2 = torch.empty(49152, 576, device="meta")  # float32, tied to the embedding
    # bf16: 49152 x 576 x 2 B = 56623104 B = 2.25 x 24 MiB -> 3 blocks of 16384 rows; a CPU
    # forward chunk of 24 MiB / (4 B x 16384) = 384 rows
    assert head_plan(smollm2, cpu, True) == (384, 512, 16384)
    assert head_plan(smollm2, cpu, False) == (128, 512, 49152)  # float32 products: nothing cast
    assert head_plan(smollm2.bfloat16(), cpu, True) == (128, 512, 49152)  # stored in bf16: nothing cast
    # Llama 3.2 1B: 128256 x 2048 x 2 B = 20.875 x 24 MiB -> 21 blocks of ceil(128256 / 21) = 6108
    assert head_plan(torch.empty(128256, 2048, device="meta"), cuda, True) == (512, 512, 6108)


def test_chunk_rows_keep_a_cpu_forward_chunk_under_24_mib_of_float32_logits():
    from ulma.logprobs import chunk_rows

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunk_rows(cpu, 49152) == (128, 512)  # 24 MiB / (4 B x 49152) = 128 exactly (SmolLM2)
    assert chunk_rows(cpu, 151936) == (41, 512)  # 25165824 / 607744 = 41.4 (Qwen2)
    assert chunk_rows(cpu, 100) == (512, 512)  # a small vocabulary: never over FUSED_CHUNK
    assert chunk_rows(cpu, 2_000_000) == (16, 512)  # never under 16 rows
    assert chunk_rows(cuda, 49152) == (512, 512)


THREE_ROWS = [("How do I bake bread?", "Mix flour, water, yeast and salt, then knead and bake."),
              ("Hi", "Hello! How can I help?"), ("Tell me a secret.", "No.")]


def _batch(tokenizer, rows=THREE_ROWS, max_length=48):
    from ulma.data.schema import Turn
    from ulma.data.tokenize import SequenceTable, Tokenizer, pad_rows

    tok, table = Tokenizer(tokenizer, max_length=max_length), SequenceTable()
    for prompt, response in rows:
        tok.add(table, (Turn(role="user", content=prompt),), response, "test")
    return pad_rows(table, list(range(len(rows))), tokenizer.pad_token_id)


def _tiny_policy(tiny_model_dir, lora: bool):
    from ulma.config import LoraConfig, ModelConfig
    from ulma.models import load_policy

    torch.manual_seed(0)
    model = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(enabled=lora, dropout=0.0)))
    if lora:  # a non-zero adapter, so the LoRA path shows in the hidden states
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    return model


def test_fused_output_layer_equals_the_models_logits(tiny_model_dir, tokenizer):
    """Log-probs, per-token log-probs and every trainable gradient, LoRA and full fine-tuning,
    are those of the model's own logits (the tiny model ties lm_head to the embeddings)."""
    from ulma.logprobs import forward_logps, fusable_head

    batch = _batch(tokenizer)
    for lora in (True, False):
        model = _tiny_policy(tiny_model_dir, lora)
        assert fusable_head(model) is not None
        results, grads = [], []
        for fused in (True, False):
            model.zero_grad()
            out = forward_logps(model, batch, bf16=False, need_tokens=True, fused=fused)
            (out["sum"] * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
            results.append(out)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        f, u = results
        assert torch.equal(f["count"], u["count"]) and f["count"].tolist() == batch["loss_mask"][:, 1:].sum(-1).tolist()
        assert torch.allclose(f["sum"], u["sum"], rtol=1e-5, atol=1e-4)
        k = u["tokens"].shape[1]  # the unfused path keeps the last k positions only
        assert torch.allclose(f["tokens"][:, -k:], u["tokens"], atol=1e-5) and not f["tokens"][:, :-k].any()
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
        for n in grads[0]:
            a, b = grads[0][n], grads[1][n]
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max())), n


def test_an_output_layer_cast_in_blocks_gives_the_results_of_one_cast(tiny_model_dir, tokenizer, monkeypatch):
    """Under bf16 autocast the tied float32 output layer (49152 x 32) is cast in 7 blocks
    when just under 512 KiB may be cast at a time (3 MiB / (512 KiB - 1 B) = 6.00001 -> 7 blocks),
    with LoRA and full fine-tuning: the log-probs and gradients of one whole cast."""
    import ulma.logprobs as lp

    batch = _batch(tokenizer)
    for lora in (True, False):
        model = _tiny_policy(tiny_model_dir, lora)
        results, grads, plans = [], [], []
        for cap in (1 << 30, (512 << 10) - 1):
            monkeypatch.setattr(lp, "HEAD_BLOCK_BYTES", cap)
            plans.append(lp.head_plan(lp.fusable_head(model).weight, torch.device("cpu"), True)[2])
            model.zero_grad()
            out = lp.forward_logps(model, batch, bf16=True)
            (out["sum"] * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
            results.append(out["sum"].detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert plans == [49152, 7022]  # ceil(49152 / 7)
        assert torch.allclose(results[0], results[1], atol=1e-4)
        for n in grads[0]:  # bf16 products summed over blocks in float32, not rounded once: close
            a, b = grads[0][n], grads[1][n]
            assert torch.allclose(a, b, atol=2e-2 * float(b.abs().max())), n


def test_shared_prompts_equal_whole_rows(tiny_model_dir, tokenizer):
    """Rows that share a prompt (a pair's chosen and rejected), packed as [prompt, response,
    response] with the prompt run once, give the log-probs, per-token log-probs and trainable
    gradients of the model's own logits over each whole row; LoRA and full fine-tuning."""
    from ulma.logprobs import forward_logps, pack_prompts

    bread, hi = "How do I bake bread?", "Hi"
    rows = [(bread, "Mix flour, water, yeast and salt, then knead and bake."), (hi, "Hello! How can I help?"),
            (bread, "No."), ("Tell me a secret.", "No."), (hi, "Go away, I am busy with something else.")]
    batch = _batch(tokenizer, rows, max_length=96)  # no row cut: 48 would cut row 0's prompt
    n_prompt = [len(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)) for p, _ in rows]
    n_resp = [int(batch["attention_mask"][i].sum()) - n_prompt[i] for i in range(5)]
    pack = pack_prompts(batch)
    # 3 packed rows: bread + 2 responses, hi + 2 responses, secret + 1
    widths = [n_prompt[0] + n_resp[0] + n_resp[2], n_prompt[1] + n_resp[1] + n_resp[4], n_prompt[3] + n_resp[3]]
    assert tuple(pack["input_ids"].shape) == (3, max(widths))
    ids = batch["input_ids"]
    assert pack["input_ids"][0, : widths[0]].tolist() == (ids[0, : n_prompt[0] + n_resp[0]].tolist()
                                                           + ids[2, n_prompt[2] : n_prompt[2] + n_resp[2]].tolist())
    # row 2's response continues the prompt's positions and sees the prompt, not row 0's response
    o = n_prompt[0] + n_resp[0]
    assert pack["position_ids"][0, o : o + n_resp[2]].tolist() == list(range(n_prompt[0], n_prompt[0] + n_resp[2]))
    seen = pack["attention_mask"][0, 0, o]
    assert seen[: n_prompt[0]].all() and not seen[n_prompt[0] : o].any() and seen[o] and not seen[o + 1 :].any()
    assert len(pack["targets"]) == int(batch["loss_mask"].sum())
    assert pack_prompts(_batch(tokenizer)) is None  # no prompt repeats: nothing to share
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    for lora in (True, False):
        model = _tiny_policy(tiny_model_dir, lora)
        inner = model.get_base_model().model if lora else model.model
        results, grads, calls = [], [], []
        hook = inner.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]),
                                               with_kwargs=True)
        for fused, share in ((True, True), (False, False)):
            model.zero_grad()
            out = forward_logps(model, batch, bf16=False, need_tokens=True, fused=fused, share_prompts=share)
            (out["sum"] * weights).sum().backward()
            results.append(out)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        hook.remove()
        assert calls == [3, 5]  # packed: 3 rows; whole rows: 5
        s, w = results
        assert torch.equal(s["count"], w["count"])
        assert torch.allclose(s["sum"], w["sum"], rtol=1e-5, atol=1e-4)
        k = w["tokens"].shape[1]  # the model's-logits path keeps the last k positions only
        assert torch.allclose(s["tokens"][:, -k:], w["tokens"], atol=1e-5) and not s["tokens"][:, :-k].any()
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
        for n in grads[0]:
            a, b = grads[0][n], grads[1][n]
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), n


def test_packs_prompts_where_forward_logps_packs_them(tiny_model_dir):
    """Packing needs the fused output layer, share_prompts and SDPA attention (its mask)."""
    from ulma.logprobs import hidden_size, packs_prompts

    model = _tiny_policy(tiny_model_dir, lora=False)
    assert hidden_size(model) == model.config.hidden_size > 0
    assert packs_prompts(model) and packs_prompts(model, fused=True, share_prompts=True)
    assert not packs_prompts(model, fused=False) and not packs_prompts(model, share_prompts=False)
    model.config._attn_implementation = "eager"
    assert not packs_prompts(model)


def test_packing_is_used_only_where_it_costs_less():
    """Two rows share a 1-token prompt, each with a 10-token response: T = 11, packed W = 21.
    Tokens: 1 x 21 < 2 x 11.  Cost per row W x (6h + W): h = 1 -> 567 > 2 x 11 x 17 = 374
    (attention's W^2 dominates: no packing); h = 1000 -> 126441 < 132242 (packing)."""
    from ulma.logprobs import pack_prompts

    ids = torch.cat([torch.full((2, 1), 7), torch.arange(20).view(2, 10) + 10], 1)  # [2, 11]
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 11, dtype=torch.long),
             "loss_mask": torch.cat([torch.zeros(2, 1, dtype=torch.bool), torch.ones(2, 10, dtype=torch.bool)], 1)}
    assert pack_prompts(batch)["input_ids"].tolist() == [[7] + list(range(10, 30))]
    assert pack_prompts(batch, hidden=1) is None
    assert pack_prompts(batch, hidden=1000)["src_pos"].tolist() == list(range(10)) + [0] + list(range(11, 20))


def test_a_packed_row_is_padded_to_a_multiple_and_its_padding_attends_to_itself():
    """The batch of the test above, its width padded to 16 (as pad_rows does with multiple 16),
    at hidden 1000: packed, its one row of 21 tokens is 24 wide with multiple 8, the 3 pad
    positions (id 0) attend to themselves only, and the scored tokens' sources do not move.
    Costs are counted at the padded widths: 1 x 24 x 6024 = 144576 < 2 x 16 x 6016 = 192512
    (packed); against the unpadded 11-wide rows, 2 x 11 x 6011 = 132242, it is not."""
    from ulma.logprobs import pack_prompts

    ids = torch.cat([torch.full((2, 1), 7), torch.arange(20).view(2, 10) + 10], 1)
    mask = torch.cat([torch.zeros(2, 1, dtype=torch.bool), torch.ones(2, 10, dtype=torch.bool)], 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 11, dtype=torch.long), "loss_mask": mask}
    assert pack_prompts(batch, hidden=1000, multiple=8) is None
    pad = lambda t: torch.cat([t, torch.zeros(2, 5, dtype=t.dtype)], 1)  # noqa: E731
    pack = pack_prompts({k: pad(v) for k, v in batch.items()}, hidden=1000, multiple=8)
    assert pack["input_ids"].tolist() == [[7] + list(range(10, 30)) + [0, 0, 0]]
    assert pack["src_pos"].tolist() == list(range(10)) + [0] + list(range(11, 20))
    seen = pack["attention_mask"][0, 0]
    assert [seen[i].nonzero().flatten().tolist() for i in (21, 22, 23)] == [[21], [22], [23]]


def test_shapes_rounded_up_to_a_multiple_change_no_result(tiny_model_dir, tokenizer):
    """``train.pad_to_multiple_of``: the batch's width, the packed width and the number of
    scored positions rounded up to 16 give the log-probs and trainable gradients of exact
    shapes (whole rows and packed prompts; LoRA and full fine-tuning)."""
    from ulma.data.schema import Turn
    from ulma.data.tokenize import SequenceTable, Tokenizer, pad_rows
    from ulma.logprobs import LinearTokenLogps, forward_logps

    bread, hi = "How do I bake bread?", "Hi"
    rows = [(bread, "Mix flour, water, yeast and salt, then knead and bake."), (hi, "Hello! How can I help?"),
            (bread, "No."), ("Tell me a secret.", "No."), (hi, "Go away, I am busy with something else.")]
    tok, table = Tokenizer(tokenizer, max_length=96), SequenceTable()
    for prompt, response in rows:
        tok.add(table, (Turn(role="user", content=prompt),), response, "test")
    exact, padded = (pad_rows(table, list(range(5)), tokenizer.pad_token_id, m) for m in (1, 16))
    longest = max(len(s.input_ids) for s in table.sequences)
    assert exact["input_ids"].shape == (5, longest) and padded["input_ids"].shape == (5, -(-longest // 16) * 16)
    assert torch.equal(padded["input_ids"][:, :longest], exact["input_ids"]) and not padded["loss_mask"][:, longest:].any()
    scored = int(exact["loss_mask"][:, 1:].sum())
    seen = []  # rows of hidden states the fused output layer is given
    apply = LinearTokenLogps.apply
    LinearTokenLogps.apply = lambda h, *a: (seen.append(h.shape[0]), apply(h, *a))[1]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])
    try:
        for lora in (True, False):
            model = _tiny_policy(tiny_model_dir, lora)
            for share in (True, False):
                results, grads = [], []
                for batch, m in ((exact, 1), (padded, 16)):
                    model.zero_grad()
                    out = forward_logps(model, batch, bf16=False, share_prompts=share, multiple=m)
                    (out["sum"] * weights).sum().backward()
                    results.append(out)
                    grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
                assert seen[-2:] == [scored, -(-scored // 16) * 16]
                assert torch.equal(results[0]["count"], results[1]["count"])
                assert torch.allclose(results[0]["sum"], results[1]["sum"], rtol=1e-5, atol=1e-4)
                for n in grads[0]:
                    a, b = grads[0][n], grads[1][n]
                    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), (n, share)
    finally:
        LinearTokenLogps.apply = apply


def test_forward_passes_skip_cudnn_attention():
    """Every forward pass (and generation) turns cuDNN's attention off: on CUDA it builds a
    graph per new shape (2-3.8 s a LoRA step on an H100).  The backend flags PyTorch reads
    when it picks a kernel are set inside the context, with flash, memory-efficient and
    math attention left on, and restored after.  (Needs no GPU: the flags are process state.)"""
    from ulma.logprobs import attention_kernels, autocast

    flags = lambda: (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    before = flags()
    assert before == (True, True, True, True)  # PyTorch's default: every backend allowed
    for ctx in (attention_kernels(), autocast(torch.device("cuda"), False), autocast(torch.device("cpu"), False)):
        with ctx:
            assert flags() == (False, True, True, True)
        assert flags() == before
    with autocast(torch.device("cpu"), True):
        assert torch.is_autocast_enabled("cpu")


def test_final_hidden_states_by_a_hook_equal_the_models_own(tiny_model_dir, tokenizer):
    """The decoder's output taken by a forward hook is the model's last hidden state (after
    the final norm), bit for bit, through PEFT's wrapper too, and installs none of Hugging
    Face's output-capturing hooks (which a compiled layer cannot trace)."""
    from ulma.logprobs import _decoder, final_hidden_states

    batch = _batch(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for lora in (True, False):
        model = _tiny_policy(tiny_model_dir, lora)
        assert type(_decoder(model)).__name__ == "LlamaModel"
        with torch.no_grad():
            hooked = final_hidden_states(model, inputs)
            base = model.get_base_model() if lora else model
            assert not getattr(base, "_output_capturing_hooks_installed", False)
            own = model(**inputs, output_hidden_states=True).hidden_states[-1]
        assert hooked.shape == (3, batch["input_ids"].shape[1], 32) and torch.equal(hooked, own)
        assert not _decoder(model)._forward_hooks  # the hook was removed


def test_forward_only_batch_size_changes_no_result(tiny_model_dir, tokenizer):
    """train.forward_batch_size (4x the micro-batch on CUDA by default) only changes which rows
    share a padded forward pass: each row's log-prob sum and count are those of the row alone."""
    from ulma.data.schema import Turn
    from ulma.data.tokenize import SequenceTable, Tokenizer, pad_rows
    from ulma.evaluation.metrics import table_logps
    from ulma.logprobs import forward_logps

    tok, table = Tokenizer(tokenizer, max_length=96), SequenceTable()
    prompts = ["How do I bake bread?", "Hi", "Tell me a secret."]
    for i in range(7):
        tok.add(table, (Turn(role="user", content=prompts[i % 3]),), " ".join(["word"] * (1 + 4 * i)) + ".", "test")
    model = _tiny_policy(tiny_model_dir, lora=False)
    alone = [forward_logps(model, pad_rows(table, [i], tokenizer.pad_token_id), bf16=False, fused=False,
                           share_prompts=False) for i in range(7)]
    expected = torch.cat([a["sum"] for a in alone]).detach()
    for size in (1, 3, 7):
        out = table_logps(model, table, tokenizer.pad_token_id, size, False, progress=False)
        assert out["count"].tolist() == [int(a["count"]) for a in alone]
        assert torch.allclose(out["sum"], expected, rtol=1e-5, atol=1e-4), size


@pytest.mark.parametrize("lora", [False, True])
def test_a_forward_only_pass_casts_each_weight_once(tiny_model_dir, tokenizer, lora):
    """Under bf16 autocast a pass of several batches (table_logps) casts each float32 weight
    to bf16 once, not once a batch, trainable or frozen (LoRA's base layers and the tied
    output layer), and gives bit for bit what batch-by-batch forward passes give (the casts
    are the same roundings)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ulma.data.schema import Turn
    from ulma.data.tokenize import SequenceTable, Tokenizer, pad_rows
    from ulma.evaluation.metrics import _longest_first, table_logps
    from ulma.logprobs import forward_logps

    tok, table = Tokenizer(tokenizer, max_length=96), SequenceTable()
    prompts = ["How do I bake bread?", "Hi", "Tell me a secret."]
    for i in range(7):
        tok.add(table, (Turn(role="user", content=prompts[i % 3]),), " ".join(["word"] * (1 + 4 * i)) + ".", "test")
    model = _tiny_policy(tiny_model_dir, lora=lora).eval()  # float32, lm_head tied to the embeddings
    weights = {p.data_ptr(): n for n, p in model.named_parameters() if p.dim() == 2}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                name = weights.get(args[0].data_ptr())
                if name is not None:
                    self.counts[name] = self.counts.get(name, 0) + 1
            return func(*args, **kwargs)

    order = _longest_first(table, list(range(7)), True)
    batches = [order[s : s + 3] for s in range(0, 7, 3)]  # 3 batches: 3 + 3 + 1 rows
    per_batch, pass_ = Casts(), Casts()
    with torch.no_grad(), per_batch:
        expected = torch.zeros(7)
        for rows in batches:
            expected[rows] = forward_logps(model, pad_rows(table, rows, tokenizer.pad_token_id), bf16=True)["sum"].float()
    with pass_:
        out = table_logps(model, table, tokenizer.pad_token_id, 3, True, progress=False)
    # The tied output layer's weight is cast once a batch, for the fused output layer (the
    # model's own call of it returns empty logits), and once in the pass.
    head = next(n for n in per_batch.counts if n.endswith("embed_tokens.weight"))
    linears = set(per_batch.counts) - {head}
    assert per_batch.counts[head] == 3 and pass_.counts[head] == 1
    # 7 Linears a layer, 2 layers; with LoRA the adapters (A and B on the 4 attention
    # projections, trainable) are cast too
    assert len(linears) == 7 * 2 + (2 * 4 * 2 if lora else 0) and {per_batch.counts[n] for n in linears} == {3}
    assert set(pass_.counts) == set(per_batch.counts) and {pass_.counts[n] for n in linears} == {1}
    assert any(n not in trainable for n in linears) == lora  # frozen base layers were cached too
    assert torch.equal(out["sum"], expected)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # flags restored


@pytest.mark.parametrize("fused", [True, False])
def test_right_padded_rows_run_without_a_mask_and_score_as_each_row_alone(tiny_model_dir, tokenizer, fused):
    """A right-padded batch runs with no attention mask (the causal kernel: grouped key/value
    heads are not repeated), and each row's log-probs and the gradients are those of the row
    run alone, unpadded; a left-padded batch keeps its mask."""
    from ulma.logprobs import forward_logps, padding_mask

    batch = _batch(tokenizer)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3  # three widths: two rows carry padding
    left = {"attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
    assert padding_mask(batch, torch.device("cpu")) is None
    assert torch.equal(padding_mask(left, torch.device("cpu")), left["attention_mask"])

    model = _tiny_policy(tiny_model_dir, lora=False)
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    kw = dict(bf16=False, fused=fused, share_prompts=False)
    padded = forward_logps(model, batch, **kw)["sum"]
    grad = torch.autograd.grad(padded.sum(), model.lm_head.weight)[0]
    hook.remove()
    assert seen == [None]
    alone, grad_alone = [], torch.zeros_like(grad)
    for i, n in enumerate(lengths):
        row = {k: v[i : i + 1, :n] for k, v in batch.items() if k != "rows"}
        s = forward_logps(model, row, **kw)["sum"]
        grad_alone += torch.autograd.grad(s.sum(), model.lm_head.weight)[0]
        alone.append(s.detach())
    assert torch.allclose(padded.detach(), torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad, grad_alone, rtol=1e-4, atol=1e-6)
