"""Tokenization with the real SmolLM2 tokenizer (ChatML template, EOS = <|im_end|> = 2)."""

import torch

from ulma.data.schema import pair, pointwise, user_prompt
from ulma.data.tokenize import Tokenizer, build_units, collate, fit

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_chat_template_and_response_tokens(tokenizer):
    tok = Tokenizer(tokenizer, max_length=512)
    prompt = tok.encode_prompt(user_prompt("Hi"))
    expected_text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(prompt) == expected_text
    assert prompt[0] == 1  # <|im_start|>
    # "Hello world" is [19556, 905] in SmolLM2's vocabulary; EOS (<|im_end|>, id 2) is appended.
    assert tok.encode_response("Hello world") == [19556, 905, 2]


def test_loss_mask_covers_exactly_the_response_and_eos(tokenizer):
    tok = Tokenizer(tokenizer, max_length=512)
    units = build_units([pointwise(user_prompt("Hi"), "Hello world", 1, binary=True)], tok)
    n_prompt = len(tok.encode_prompt(user_prompt("Hi")))
    batch = collate(units, [0], tokenizer.pad_token_id)
    ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
    assert ids[mask].tolist() == [19556, 905, 2]
    assert mask.nonzero().flatten().tolist() == [n_prompt, n_prompt + 1, n_prompt + 2]
    assert batch["labels"].tolist() == [1.0] and batch["positive"].tolist() == [True]


def test_fit_cuts_prompt_from_the_left_then_response_from_the_right():
    assert fit([1, 2, 3, 4, 5], [6, 7], 5) == ([3, 4, 5, 6, 7], 3, 1, 0)
    assert fit([1, 2], [6, 7], 5) == ([1, 2, 6, 7], 2, 0, 0)
    # the response alone is too long: keep min_prompt=2 prompt tokens, cut the response's end
    assert fit([1, 2, 3], [6, 7, 8, 9, 10], 5, min_prompt=2) == ([2, 3, 6, 7, 8], 2, 1, 1)


def test_a_pairs_prompt_is_cut_as_for_its_longer_response():
    # alone, [6, 7] keeps 3 prompt tokens; with a partner of 4 tokens it keeps 1, like the partner
    assert fit([1, 2, 3, 4, 5], [6, 7], 5, min_prompt=1, partner=4) == ([5, 6, 7], 1, 1, 0)
    assert fit([1, 2, 3, 4, 5], [6, 7, 8, 9], 5, min_prompt=1, partner=2) == ([5, 6, 7, 8, 9], 1, 1, 0)
    # a partner longer than the room for a response counts as that room (it is cut too)
    assert fit([1, 2, 3], [6], 5, min_prompt=2, partner=9) == ([2, 3, 6], 2, 1, 0)


def test_both_rows_of_a_cut_pair_keep_the_same_prompt(tokenizer):
    tok = Tokenizer(tokenizer, max_length=48)
    units = build_units([pair(user_prompt("word " * 30), "Yes, here are three words for you.", "No.")], tok)
    (c, r), seqs = units.rows[0], units.table.sequences
    n_yes, n_no = len(tok.encode_response("Yes, here are three words for you.")), len(tok.encode_response("No."))
    assert seqs[c].n_prompt == seqs[r].n_prompt == 48 - n_yes
    assert seqs[c].input_ids[: seqs[c].n_prompt] == seqs[r].input_ids[: seqs[r].n_prompt]
    assert len(seqs[c].input_ids) == 48 and len(seqs[r].input_ids) == 48 - n_yes + n_no


def test_truncation_is_counted(tokenizer):
    tok = Tokenizer(tokenizer, max_length=40)
    long_prompt = user_prompt("word " * 50)
    units = build_units([pointwise(long_prompt, "ok", 0, binary=True), pointwise(user_prompt("x"), "ok", 1, binary=True)], tok)
    assert units.table.prompt_truncated == 1 and units.table.response_truncated == 0
    seq = units.table.sequences[0]
    assert len(seq.input_ids) == 40 and seq.input_ids[-2:] == tok.encode_response("ok")[-2:]


def test_pairs_are_flattened_chosen_then_rejected_and_padded_right(tokenizer):
    tok = Tokenizer(tokenizer, max_length=512)
    p = user_prompt("Hi")
    units = build_units([pair(p, "Hello world", "No"), pair(p, "Yes", "Hello world")], tok)
    assert len(units.table) == 3  # "Hello world" after the same prompt is stored once
    assert units.rows == [(0, 1), (2, 0)]
    batch = collate(units, [0, 1], tokenizer.pad_token_id)
    assert batch["rows"].tolist() == [0, 2, 1, 0]
    ids, attn = batch["input_ids"], batch["attention_mask"]
    width = ids.shape[1]
    n_no = len(units.table.sequences[1].input_ids)
    assert attn[2].tolist() == [1] * n_no + [0] * (width - n_no)
    assert (ids[2, n_no:] == tokenizer.pad_token_id).all()
    assert torch.equal(batch["labels"], torch.tensor([1.0, 1.0]))


def test_a_pairs_packed_length_counts_its_prompt_once():
    from ulma.data.tokenize import Sequence, SequenceTable, Units

    # prompt [1, 2, 3]; chosen response 4 tokens, rejected 2; a point-wise row of 6 tokens
    table = SequenceTable([Sequence([1, 2, 3, 4, 5, 6, 7], 3), Sequence([1, 2, 3, 8, 9], 3),
                           Sequence([9, 9, 9, 9, 4, 5], 4), Sequence([7, 2, 3, 8, 9], 3)])
    units = Units(table, rows=[(0, 1), (2,), (0, 3)])
    assert [units.length(i) for i in range(3)] == [7, 6, 7]  # the longest row
    # packed: 3 + 4 + 2; one row is itself; different prompts are not packed: the longest row
    assert [units.length(i, packed=True) for i in range(3)] == [9, 6, 7]


def test_length_grouping_sorts_pairs_by_packed_width():
    from ulma.data.tokenize import Sequence, SequenceTable, Units
    from ulma.loop import epoch_plan

    # pair 0: rows of 10 and 10 tokens after a 6-token prompt -> longest 10, packed 14
    # pair 1: rows of 12 and 7 after a 6-token prompt -> longest 12, packed 13
    # pair 2: rows of 11 and 11 after a 2-token prompt -> longest 11, packed 20
    seqs = [Sequence([1] * 6 + [5] * 4, 6), Sequence([1] * 6 + [6] * 4, 6),
            Sequence([2] * 6 + [5] * 6, 6), Sequence([2] * 6 + [6] * 1, 6),
            Sequence([3] * 2 + [5] * 9, 2), Sequence([3] * 2 + [6] * 9, 2)]
    units = Units(SequenceTable(seqs), rows=[(0, 1), (2, 3), (4, 5)])
    flat = lambda plan: [i for b in plan for i in b]  # noqa: E731
    assert flat(epoch_plan(units, 3, 1, 0, 0, True)) == [0, 2, 1]  # 10 < 11 < 12
    assert flat(epoch_plan(units, 3, 1, 0, 0, True, packed=True)) == [1, 0, 2]  # 13 < 14 < 20


def test_length_grouping_runs_the_heaviest_micro_batch_first():
    """Rows x longest row decides (ties: the most tokens); the rest keep their shuffled order."""
    from ulma.data.tokenize import Sequence, SequenceTable, Units
    from ulma.loop import epoch_plan

    def units_of(lengths):
        return Units(SequenceTable([Sequence([7] * n, 1) for n in lengths]), rows=[(i,) for i in range(len(lengths))])

    # sorted by length 2 3 4 5 8 9 -> micro-batches {4, 0}, {2, 5}, {3, 1}: padded 2x3, 2x5, 2x9
    units = units_of([3, 9, 4, 8, 2, 5])
    for seed in range(6):
        plan = epoch_plan(units, 2, 1, seed, 0, True)
        assert plan[0] == [3, 1]
        assert sorted(map(tuple, plan)) == [(2, 5), (3, 1), (4, 0)]
    # micro-batches of 3 over 6 6 6 7 9: {1, 3, 4} pads to 3 x 6 = 18 with 18 tokens, the short
    # last one {0, 2} to 2 x 9 = 18 with 16: the tie goes to the most tokens
    units = units_of([7, 6, 9, 6, 6])
    for seed in range(6):
        plan = epoch_plan(units, 3, 1, seed, 0, True)
        assert sorted(plan[0]) == [1, 3, 4] and sorted(plan[1]) == [0, 2]
    # without grouping nothing moves: the first micro-batch is the shuffle's
    firsts = {tuple(epoch_plan(units_of([3, 9, 4, 8, 2, 5]), 2, 1, seed, 0, False)[0]) for seed in range(6)}
    assert len(firsts) > 1


def _shape_table():
    """Prompt A = [1, 2, 3] with responses of 4, 2 and 3 tokens (rows 0, 1, 3: 7, 5, 6
    tokens); prompt B = [9, 9, 9, 9] with a response of 2 (row 2: 6 tokens)."""
    from ulma.data.tokenize import Sequence, SequenceTable

    return SequenceTable([Sequence([1, 2, 3, 4, 5, 6, 7], 3), Sequence([1, 2, 3, 8, 9], 3),
                          Sequence([9, 9, 9, 9, 4, 5], 4), Sequence([1, 2, 3, 6, 6, 6], 3)])


def test_forward_shape_by_hand():
    """Unpacked: 4 rows x 7.  Packed: A = 3 + 4 + 2 + 3 = 12, B = 6 -> 2 rows x 12.
    Tokens: 24 < 28 -> packed.  multiple 8: 2 x 16 = 32, not below 4 x 8 = 32 -> unpacked.
    hidden 1: 2 x 12 x (6 + 12) = 432 > 4 x 7 x (6 + 7) = 364 -> unpacked."""
    from ulma.data.tokenize import forward_shape

    seqs = _shape_table().sequences
    assert forward_shape(seqs) == (4, 7)
    assert forward_shape(seqs, share_prompts=True) == (2, 12)
    assert forward_shape(seqs, share_prompts=True, multiple=8) == (4, 8)
    assert forward_shape(seqs, share_prompts=True, hidden=1) == (4, 7)
    assert forward_shape(seqs[:3], share_prompts=True) == (2, 9)  # A = 3 + 4 + 2: 18 < 3 x 7


def test_forward_shape_is_the_shape_pack_prompts_runs():
    """A second implementation: the collated batch through logprobs.pack_prompts (tensors)
    gives the shape forward_shape predicts from the rows, on random tables."""
    import random

    from ulma.data.tokenize import Sequence, SequenceTable, forward_shape, pad_rows
    from ulma.logprobs import pack_prompts

    rng = random.Random(0)
    prompts = [[7] * 3, [8] * 9, [5, 6]]
    packed_seen = unpacked_seen = 0
    for _ in range(200):
        n = rng.randint(2, 8)
        seqs = [Sequence(p + [rng.randint(10, 20)] * rng.randint(1, 12), len(p))
                for p in (rng.choice(prompts) for _ in range(n))]
        hidden, multiple = rng.choice([0, 1, 64]), rng.choice([1, 4])
        batch = pad_rows(SequenceTable(seqs), list(range(n)), 0, multiple)
        pack = pack_prompts(batch, hidden, multiple)
        expected = tuple(batch["input_ids"].shape) if pack is None else tuple(pack["input_ids"].shape)
        assert forward_shape(seqs, True, hidden, multiple) == expected
        packed_seen += pack is not None
        unpacked_seen += pack is None
    assert packed_seen > 20 and unpacked_seen > 20


def test_the_heaviest_forward_runs_first_with_shared_prompts():
    """Point-wise units 0 and 1 share a 3-token prompt (rows of 8 and 8), units 2 and 3 do not
    (7 and 7).  Sorted by length the micro-batches of 2 are {2, 3} and {0, 1}.  Unpacked,
    {0, 1} runs 2 x 8 = 16 positions against 14; packed it runs one row of 3 + 5 + 5 = 13,
    so {2, 3} (2 x 7) is the heavier forward and goes first."""
    from ulma.data.tokenize import Sequence, SequenceTable, Units
    from ulma.loop import batch_weight, epoch_plan

    seqs = [Sequence([1, 2, 3] + [4] * 5, 3), Sequence([1, 2, 3] + [5] * 5, 3),
            Sequence([6] * 3 + [4] * 4, 3), Sequence([7] * 3 + [4] * 4, 3)]
    units = Units(SequenceTable(seqs), rows=[(0,), (1,), (2,), (3,)])
    assert batch_weight(units, [0, 1]) == (16, 16)
    assert batch_weight(units, [0, 1], packed=True) == (13, 16)
    for seed in range(6):
        assert sorted(epoch_plan(units, 2, 1, seed, 0, True)[0]) == [0, 1]
        assert sorted(epoch_plan(units, 2, 1, seed, 0, True, packed=True)[0]) == [2, 3]
    # two processes, two units each: the heavier share counts (13 vs 14 positions); as one
    # forward, widths 13, 7, 7 packed = 3 x 13 = 39 >= 4 x 8: unpacked, 32 positions
    assert batch_weight(units, [0, 1, 2, 3], world=2, packed=True) == (14, 30)
    assert batch_weight(units, [0, 1, 2, 3], world=1, packed=True) == (32, 30)
