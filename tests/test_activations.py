"""ulma.activations: gated MLPs that keep gate and up, not silu(gate), for the backward;
dropout that keeps a bool mask."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ulma.activations import MaskDropout, SiluMul, lean_activations


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


def saved_bytes(model, ids):
    """Bytes of the distinct tensors a training forward keeps for its backward, parameters aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids).logits.float().square().mean()
    return sum(kept.values()), loss


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
