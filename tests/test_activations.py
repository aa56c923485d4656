"""ulma.activations: gated MLPs that keep gate and up, not silu(gate), for the backward;
dropout that keeps a bool mask; LoRA branches recomputed in the backward."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ulma.activations import MaskDropout, SiluMul, keep_less, lean_activations, pack_bits, recompute_lora, unpack_bits


def test_silu_mul_by_hand():
    """silu(g) = g / (1 + e^-g); d/du = silu(g); d/dg = u * s(g) * (1 + g * (1 - s(g)))."""
    gate = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64, requires_grad=True)
    up = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64, requires_grad=True)
    out = SiluMul.apply(gate, up)
    s1, s2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(2))  # logistic at 1 and -2
    assert out.tolist() == pytest.approx([0.0, 3 * s1, 0.5 * -2 * s2], abs=1e-12)
    out.backward(torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    assert up.grad.tolist() == pytest.approx([0.0, s1, 2 * -2 * s2], abs=1e-12)
    # silu'(0) = 1/2; silu'(1) = s1 (1 + (1 - s1)); silu'(-2) = s2 (1 - 2 (1 - s2))
    assert gate.grad.tolist() == pytest.approx([2 * 0.5, 3 * s1 * (2 - s1), 2 * 0.5 * s2 * (1 - 2 * (1 - s2))],
                                               abs=1e-12)


def test_silu_mul_equals_the_eager_ops_bit_for_bit():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        g, u, w = (torch.randn(3, 5, 16, dtype=dtype) for _ in range(3))
        a = [t.clone().requires_grad_() for t in (g, u)]
        b = [t.clone().requires_grad_() for t in (g, u)]
        ya, yb = torch.nn.functional.silu(a[0]) * a[1], SiluMul.apply(*b)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        assert torch.equal(ya, yb) and torch.equal(a[0].grad, b[0].grad) and torch.equal(a[1].grad, b[1].grad)


def tiny_llama(**kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, **kw)
    return LlamaForCausalLM(cfg)


def kept_tensors(model, ids, bf16=False):
    """(dtype, shape, bytes) of each distinct tensor (by storage) a training forward keeps for
    its backward, parameters aside, and the forward's loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept.setdefault(s.data_ptr(), (t.dtype, tuple(t.shape), s.nbytes()))
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids).logits.float().square().mean()
    return list(kept.values()), loss


def saved_bytes(model, ids):
    """Bytes of the distinct tensors a training forward keeps for its backward, parameters aside."""
    kept, loss = kept_tensors(model, ids)
    return sum(k[2] for k in kept), loss


def test_lean_mlps_keep_one_mlp_wide_tensor_less_per_layer_and_train_the_same():
    eager, lean = tiny_llama(), tiny_llama()
    assert lean_activations(lean) == {"gated_mlps": 3, "dropouts": 0}
    assert lean_activations(lean) == {"gated_mlps": 0, "dropouts": 0}  # once per MLP
    ids = torch.randint(0, 50, (2, 7))
    kept_eager, loss_eager = saved_bytes(eager, ids)
    kept_lean, loss_lean = saved_bytes(lean, ids)
    # silu(gate): [2, 7, 40] float32 in each of 3 layers
    assert kept_eager - kept_lean == 3 * 2 * 7 * 40 * 4
    assert torch.equal(loss_eager, loss_lean)
    loss_eager.backward()
    loss_lean.backward()
    for (n, a), b in zip(eager.named_parameters(), lean.parameters()):
        assert torch.equal(a.grad, b.grad), n


def test_only_the_known_silu_gated_forward_is_changed(tmp_path):
    assert lean_activations(tiny_llama(hidden_act="gelu"))["gated_mlps"] == 0  # another activation

    class ScaledMLP(torch.nn.Module):  # the same parts, another computation
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) * 2

    assert lean_activations(ScaledMLP())["gated_mlps"] == 0
    # a model read back from its folder (transformers' own classes) is recognised
    tiny_llama().save_pretrained(tmp_path)
    assert lean_activations(AutoModelForCausalLM.from_pretrained(tmp_path))["gated_mlps"] == 3


def kept_by(fn, x):
    """Bytes of what ``fn(x)`` keeps for its backward."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (kept.append(t.numel() * t.element_size()), t)[1],
                                                  lambda t: t):
        y = fn(x)
    return sum(kept), y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_dropout_draws_and_trains_as_dropout_and_keeps_a_bool_mask(dtype):
    x = torch.randn(6, 50, dtype=dtype, requires_grad=True)
    g = torch.randn(6, 50, dtype=dtype)
    plain, lean = torch.nn.Dropout(0.25), MaskDropout(0.25)
    torch.manual_seed(7)
    kept_plain, a = kept_by(plain, x)
    torch.manual_seed(7)
    kept_lean, b = kept_by(lean, x)
    assert torch.equal(a, b)  # the same draws, the same scaling
    # kept elements scaled by 1 / (1 - p), that factor rounded to the input's dtype
    kept = b != 0
    assert 0 < int((~kept).sum()) < 300 and torch.equal(b[kept], (x * torch.tensor(1 / 0.75, dtype=dtype))[kept])
    (ga,), (gb,) = torch.autograd.grad(a, x, g), torch.autograd.grad(b, x, g)
    assert torch.equal(ga, gb)
    assert kept_plain == 300 * torch.finfo(dtype).bits // 8 and kept_lean == 300  # one byte an element
    lean.eval()
    assert torch.equal(lean(x), x)


def test_lora_dropouts_become_mask_dropouts():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert lean_activations(model) == {"gated_mlps": 3, "dropouts": 2 * 3}
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 6 and all(type(m) is MaskDropout and m.p == 0.1 for m in drops)


def lora_llama(dropout=0.1):
    """tiny_llama with LoRA r=4 on q/k/v/o; B drawn (PEFT starts it at zero) so that every
    LoRA weight gets a gradient."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=dropout,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5, generator=g)
    lean_activations(model)
    return model.train()


def kept_by_storage(model, ids, bf16):
    """:func:`kept_tensors` with the dropout masks seeded, and the trainable parameters'
    gradients after the backward."""
    torch.manual_seed(5)
    kept, loss = kept_tensors(model, ids, bf16)
    loss.backward()
    return kept, loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bf16", [False, True])
def test_recomputed_lora_branches_train_bit_for_bit_and_keep_less(bf16):
    """3 layers, 4 adapters each, 2 x 7 tokens of width 16, rank 4.  PEFT's own forward keeps,
    per adapter, A's input [14, 16] (under autocast a bf16 cast of it), B's input [14, 4] and,
    where the input needs a gradient, dropout's bool mask [2, 7, 16]; recomputed, none of
    them, one more float32 [2, 7, 16] a layer (the input q, k and v share) and each mask as
    bits (28 bytes)."""
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    eager, lean = lora_llama(), lora_llama()
    assert recompute_lora(lean) == 3 * 4
    assert recompute_lora(lean) == 0  # once per layer
    kept_eager, loss_eager, grads_eager = kept_by_storage(eager, ids, bf16)
    kept_lean, loss_lean, grads_lean = kept_by_storage(lean, ids, bf16)
    assert torch.equal(loss_eager, loss_lean)
    assert len(grads_eager) == 3 * 4 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads_eager.values())
    for name, g in grads_eager.items():
        assert torch.equal(g, grads_lean[name]), name  # the same masks drawn again, the same products
    size = 2 if bf16 else 4
    lora_kept = {(torch.bool, (2, 7, 16), 2 * 7 * 16): 3 * 4 - 3,  # layer 0's q/k/v read frozen embeddings
                 (torch.bfloat16 if bf16 else torch.float32, (14, 16), 14 * 16 * size): 3 * 4,
                 (torch.bfloat16 if bf16 else torch.float32, (14, 4), 14 * 4 * size): 3 * 4}
    for key, n in lora_kept.items():
        assert kept_eager.count(key) == n and kept_lean.count(key) == 0, key
    saved = sum(k[2] * n for k, n in lora_kept.items()) - 3 * 2 * 7 * 16 * 4 - 3 * 4 * 2 * 7 * 16 // 8
    assert kept_lean.count((torch.uint8, (2 * 7 * 16 // 8,), 2 * 7 * 16 // 8)) == 3 * 4  # the masks as bits
    eager_bytes, lean_bytes = (sum(k[2] for k in kept) for kept in (kept_eager, kept_lean))
    assert eager_bytes - lean_bytes >= saved  # and the casts of A and B under autocast


def test_recomputed_lora_falls_back_to_peft_where_its_forward_is_not_the_plain_one():
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    eager, lean = lora_llama(), lora_llama()
    recompute_lora(lean)
    for model in (eager, lean):
        model.eval()
    with torch.no_grad():  # nothing to record: PEFT's own forward
        assert torch.equal(eager(input_ids=ids).logits, lean(input_ids=ids).logits)
    with lean.disable_adapter(), torch.no_grad():  # adapters off: the base model's logits
        base = lean(input_ids=ids).logits
    assert not torch.equal(base, eager(input_ids=ids).logits.detach())
    lean.merge_adapter()  # merged: PEFT's base layer alone, the same function
    assert torch.allclose(lean(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-5)


def test_dora_adapters_train_through_peft_own_forward():
    """A LoRA variant (DoRA) is not the plain path: PEFT's forward runs, the same gradients."""
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    grads = []
    for patch in (False, True):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.1, use_dora=True,
                                                        target_modules=["q_proj", "v_proj"])).train()
        if patch:
            assert recompute_lora(model) == 3 * 2
        torch.manual_seed(5)
        model(input_ids=ids).logits.float().square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 3 * 2 * 3  # A, B and the magnitude vector of each adapter
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


def test_an_unknown_peft_forward_is_left_alone():
    model = lora_llama()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.forward = layer.forward  # an instance's own forward (as a patch would set) is never replaced
    assert recompute_lora(model) == 3 * 4 - 1


@pytest.mark.parametrize("setting,device,dropout,checkpointing,patched", [
    ("auto", "cpu", 0.1, False, 0),  # a CPU would redraw dropout: off
    ("auto", "cpu", 0.0, False, 12),  # nothing to redraw: on
    ("auto", "cuda", 0.1, False, 12),  # a GPU's dropout draw is cheap: on
    (True, "cpu", 0.1, False, 12),
    (False, "cuda", 0.0, False, 0),
    (True, "cpu", 0.1, True, 0),  # whole layers are rerun already
])
def test_keep_less_applies_recompute_lora_as_set(setting, device, dropout, checkpointing, patched):
    from ulma.config import LoraConfig, TrainConfig

    model = lora_llama(dropout)
    keep_less(model, TrainConfig(recompute_lora=setting, gradient_checkpointing=checkpointing),
              LoraConfig(enabled=True, dropout=dropout), device)
    assert sum("forward" in m.__dict__ and hasattr(m, "lora_A") for m in model.modules()) == patched


def test_pack_bits_by_hand():
    """8 elements a byte, the first in the lowest bit; a last byte partly filled."""
    mask = torch.tensor([True, False, True, True, False, False, False, False, True])
    assert pack_bits(mask).tolist() == [1 + 4 + 8, 1]
    assert pack_bits(torch.ones(2, 8, dtype=torch.bool)).tolist() == [255, 255]
    for shape in [(1,), (3, 5), (2, 7, 16)]:
        m = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.5
        assert torch.equal(unpack_bits(pack_bits(m), m.shape), m)
