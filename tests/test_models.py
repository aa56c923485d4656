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
