import math

import torch

from ulma.logprobs import logits_to_keep, reduce_logps, sequence_logps, token_logps


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
