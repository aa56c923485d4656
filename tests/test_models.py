import pytest
import torch

from ulma.config import LoraConfig, ModelConfig
from ulma.models import EXPECTED_SPECIAL_TOKENS, Reference, load_policy


def test_offline_default_model_special_tokens(tokenizer, smol_dir):
    # ChatML: <|im_start|> = 1 opens a turn, <|im_end|> = 2 closes it and is EOS (and padding)
    assert {k: getattr(tokenizer, k) for k in EXPECTED_SPECIAL_TOKENS} == EXPECTED_SPECIAL_TOKENS
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]  # no stray BOS prepended
    assert len(tokenizer) == 49152
    cfg = (smol_dir / "config.json").read_text()
    assert '"quantization_config"' not in cfg and '"num_hidden_layers": 30' in cfg


def test_reference_under_lora_is_the_base_with_adapters_disabled(tiny_model_dir):
    torch.manual_seed(0)
    policy = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(r=2, dropout=0.0)))
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # make the adapter matter
        adapted = policy(input_ids=ids).logits
        base = policy.get_base_model()
    ref = Reference(policy, keep_copy=False)
    assert ref.copy is None  # no second model under LoRA
    with ref.model() as net:
        ref_logits = net(input_ids=ids).logits
    with policy.disable_adapter(), torch.no_grad():
        expected = base(input_ids=ids).logits
    assert torch.equal(ref_logits, expected) and not torch.allclose(ref_logits, adapted)
    assert policy.training  # the context restores the mode


def test_full_finetuning_reference_is_a_frozen_copy(tiny_model_dir):
    policy = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(enabled=False)))
    ref = Reference(policy, keep_copy=True)
    assert all(p.requires_grad for p in policy.parameters())
    assert not any(p.requires_grad for p in ref.copy.parameters())
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert not torch.equal(next(policy.parameters()), next(ref.copy.parameters()))


def test_compile_on_a_cpu_without_a_cpp_compiler_fails_before_any_work(tiny_model_dir):
    """Inductor builds C++ for a CPU: with no compiler on the PATH, compile_layers refuses
    up front (naming the key, the compilers it looked for and the ways out); with one it
    marks the layers (nothing is built before a call)."""
    import sys

    from torch._inductor import config

    from ulma.models import compile_layers

    model = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(enabled=False)))
    with config.patch({"cpp.cxx": (None, "ulma-no-such-cxx")}):  # inductor's own way to set its config
        with pytest.raises(ValueError, match=r"^train\.compile: .*no C\+\+ compiler \(tried ulma-no-such-cxx\);"
                                             r".*compile_backend=aot_eager"):
            compile_layers(model)
        assert compile_layers(model, backend="aot_eager") == 2  # no code generation: no compiler needed
    with config.patch({"cpp.cxx": (None, sys.executable)}):  # found on the PATH: accepted
        assert compile_layers(model) == 2


def test_compiled_layers_give_the_same_losses_and_gradients(tiny_model_dir):
    """train.compile: each decoder layer through torch.compile (here its aot_eager backend:
    the same graph capture and autograd, no generated kernels -- inductor's C++ build takes
    minutes on a CPU).  Two layers compiled, parameter names unchanged (checkpoints and
    optimizer states match), and logits and every gradient equal to the eager model's, for
    batches of two widths and a no_grad pass (one graph each, dynamic shapes)."""
    from ulma.models import compile_layers

    torch.manual_seed(0)
    eager = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(enabled=False)))
    compiled = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), lora=LoraConfig(enabled=False)))
    names = [n for n, _ in compiled.named_parameters()]
    assert compile_layers(compiled, backend="aot_eager") == 2
    assert [n for n, _ in compiled.named_parameters()] == names
    for ids in (torch.tensor([[1, 5, 9, 2, 7], [1, 8, 3, 4, 6]]), torch.tensor([[1, 5, 9, 2, 7, 11, 13, 2]] * 3)):
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            logits = model(input_ids=ids).logits
            logits.float().log_softmax(-1).mean().backward()
            outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (la, ga), (lb, gb) = outs
        assert torch.allclose(la, lb, atol=1e-5)
        assert all(torch.allclose(ga[n], gb[n], atol=1e-6, rtol=1e-4) for n in ga)
    with torch.no_grad():
        assert torch.allclose(compiled(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-5)


def test_compile_finds_no_layer_in_a_model_without_them():
    from ulma.models import compile_layers

    with pytest.raises(ValueError, match="found no decoder layer to compile in Sequential"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
