"""Packed rows without padding (logprobs.pack_segments) and the block-by-block attention
that runs them (ulma.attention)."""

import pytest
import torch
import torch.nn.functional as F

from ulma.attention import Segments, install, segment_attention
from ulma.logprobs import pack_segments, use_segments


def _explicit_mask(blocks, width):
    """The [T, T] mask of a packed row, written out position by position (the second
    implementation: query q sees key k when k is in q's prefix, or in q's block at or before q)."""
    mask = torch.zeros(width, width, dtype=torch.bool)
    for start, end, p0, p1 in blocks:
        for q in range(start, end):
            mask[q, p0:p1] = True
            mask[q, start : q + 1] = True
    return mask


def test_segment_attention_equals_one_masked_attention_over_the_row():
    """Values and gradients, float64, grouped-query heads (9 query heads on 3 key/value heads):
    three blocks of one prompt (prompt + first response, two later responses: one not next
    to the prompt), then a lone causal row."""
    torch.manual_seed(0)
    blocks = ((0, 7, 0, 0), (7, 10, 0, 4), (10, 15, 0, 4), (15, 19, 15, 15))
    q = torch.randn(1, 9, 19, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 19, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 19, 8, dtype=torch.float64, requires_grad=True)
    out, weights = segment_attention(torch.nn.Module(), q, k, v, None, scaling=0.3, segments=Segments(blocks))
    assert weights is None and out.shape == (1, 19, 9, 8)
    mask = _explicit_mask(blocks, 19)
    assert mask[8].tolist() == [True] * 4 + [False] * 3 + [True] * 2 + [False] * 10  # row 8 by hand
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                          attn_mask=mask, scale=0.3).transpose(1, 2)
    assert torch.allclose(out, want, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-12)


def test_segment_attention_refuses_what_it_does_not_implement():
    q = torch.zeros(1, 3, 4, 2)
    with pytest.raises(ValueError, match="sliding_window"):
        segment_attention(torch.nn.Module(), q, q, q, None, segments=Segments(((0, 4, 0, 0),)), sliding_window=2)
    with pytest.raises(ValueError, match="row of 3 positions"):
        segment_attention(torch.nn.Module(), q, q, q, None, segments=Segments(((0, 3, 0, 0),)))


def test_pack_segments_lays_out_a_batch_by_hand():
    """Rows (pad 0), scored from position 1: A = [7, 10, 11, 12], B = [7, 20, 21] and
    E = [7, 40] share the prompt [7]; C = [8, 9, 30] has prompt [8, 9]; D scores nothing (left
    out).  A row's last token is a target only, so it is not packed: A keeps 7 10 11, B 20,
    C and E nothing after their prompts."""
    ids = torch.tensor([[7, 10, 11, 12], [7, 20, 21, 0], [8, 9, 30, 0], [5, 6, 0, 0], [7, 40, 0, 0]])
    attn = (ids > 0).long()
    loss = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
    p = pack_segments(batch)
    assert p["input_ids"].tolist() == [[7, 10, 11, 20, 8, 9]]  # [7 10 11 | 20 | 8 9]
    assert p["position_ids"].tolist() == [[0, 1, 2, 1, 0, 1]]
    assert p["attention_mask"].tolist() == [[1] * 6]
    assert p["segments"].blocks == ((0, 3, 0, 0), (3, 4, 0, 1), (4, 6, 4, 4))  # E: no block
    # scored tokens, row-major: A's 10 11 12 from 0 1 2; B's 20 from 0 (the prompt), 21 from 3;
    # C's 30 from 5; E's 40 from 0
    assert p["targets"].tolist() == [10, 11, 12, 20, 21, 30, 40]
    assert p["src_pos"].tolist() == [0, 1, 2, 0, 3, 5, 0] and p["src_row"].tolist() == [0] * 7
    alone = pack_segments(batch, share_prompts=False)  # [7 10 11 | 7 20 | 8 9 | 7]
    assert alone["input_ids"].tolist() == [[7, 10, 11, 7, 20, 8, 9, 7]]
    assert alone["segments"].blocks == ((0, 3, 0, 0), (3, 5, 3, 3), (5, 7, 5, 5), (7, 8, 7, 7))
    assert alone["src_pos"].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert pack_segments({k: v[3:4] for k, v in batch.items()}) is None


def test_the_installed_attention_is_sdpa_without_segments(tiny_model_dir, tmp_path):
    """A model switched to segment attention gives sdpa's logits bit for bit on a padded batch
    and in generation, and saves a config without the switch."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 9))
    attn = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    b = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    assert install(b) and b.config._attn_implementation == "ulma_sdpa"
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids, attention_mask=attn).logits, b(input_ids=ids, attention_mask=attn).logits)
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(a.generate(input_ids=ids[:1], **gen), b.generate(input_ids=ids[:1], **gen))
    b.save_pretrained(tmp_path)
    assert "ulma_sdpa" not in (tmp_path / "config.json").read_text()
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not install(eager) and eager.config._attn_implementation == "eager"


def test_segments_are_used_only_where_they_apply(tiny_model_dir):
    """A CPU model on sdpa without gradients; not in training, not on a GPU, not with eager
    attention, a sliding window, or compiled layers."""
    from transformers import AutoModelForCausalLM

    def load(**kw):
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kw)

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_segments(load(attn_implementation="sdpa"), cpu)  # gradients are on: training
    with torch.no_grad():
        assert use_segments(load(attn_implementation="sdpa"), cpu)
        assert not use_segments(load(attn_implementation="sdpa"), cuda)
        assert not use_segments(load(attn_implementation="eager"), cpu)
        windowed = load(attn_implementation="sdpa")
        windowed.config.sliding_window = 16  # Mistral's form: a window on every layer
        assert not use_segments(windowed, cpu)
        compiled = load(attn_implementation="sdpa")
        compiled.model.layers[0].compile()  # marks the layer; nothing is compiled before a call
        assert not use_segments(compiled, cpu)
