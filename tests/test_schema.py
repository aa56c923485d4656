import pickle

import pytest

from ulma.data.schema import (
    DataError, Pair, PointWise, as_kind, make_prompt, pair, pairs_to_pointwise, pointwise,
    pointwise_to_demonstrations, pointwise_to_pairs, user_prompt,
)

P = user_prompt("q")


def test_pairs_to_pointwise_labels_chosen_1_rejected_0():
    out = pairs_to_pointwise([pair(P, "good", "bad")])
    assert [(e.response, e.label, e.binary) for e in out] == [("good", 1.0, True), ("bad", 0.0, True)]


def test_pointwise_to_demonstrations_binary_and_best_rated():
    binary = [pointwise(P, "a", 1, binary=True), pointwise(P, "b", 0, binary=True)]
    assert [d.response for d in pointwise_to_demonstrations(binary)] == ["a"]
    scores = [pointwise(P, "x", 0.5, binary=False), pointwise(P, "y", 0.75, binary=False), pointwise(P, "z", 0.75, binary=False)]
    assert [d.response for d in pointwise_to_demonstrations(scores)] == ["y", "z"]  # best-rated = 0.75


def test_pointwise_to_pairs_orders_by_score_and_skips_ties():
    ex = [pointwise(P, "lo", 0.25, binary=False), pointwise(P, "hi", 1.0, binary=False), pointwise(P, "mid", 0.25, binary=False)]
    assert [(p.chosen, p.rejected) for p in pointwise_to_pairs(ex)] == [("hi", "lo"), ("hi", "mid")]


def test_as_kind_refuses_to_invent_pairs():
    with pytest.raises(ValueError, match="needs pairs"):
        as_kind([pointwise(P, "a", 1, binary=True)], "pair")
    assert [e.label for e in as_kind([pair(P, "a", "b")], "pointwise")] == [1.0, 0.0]


def test_bad_labels_name_the_field():
    with pytest.raises(DataError, match=r"f.jsonl, row 3, field 'label': a binary label must be 0 or 1"):
        pointwise(P, "a", 0.5, binary=True, file="f.jsonl", row=3)
    with pytest.raises(DataError, match="field 'label': must be a number"):
        pointwise(P, "a", "yes", binary=False, file="f.jsonl", row=3)
    with pytest.raises(DataError, match="outside the allowed range"):
        pointwise(P, "a", 5, binary=False, file="f.jsonl", row=3, label_range=(0, 4))
    with pytest.raises(DataError, match="field 'chosen': the response is empty"):
        pair(P, "  ", "b", file="f.jsonl", row=1)
    with pytest.raises(DataError, match="must end with a user turn"):
        make_prompt([{"role": "assistant", "content": "hi"}])


def test_prompts_are_hashable_immutable_and_picklable():
    a, b = user_prompt("same"), user_prompt("same")
    assert hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(TypeError):
        a[0]["content"] = "changed"
    e = PointWise(a, "r", 1.0)
    assert pickle.loads(pickle.dumps(e)) == e
    assert isinstance(Pair(a, "c", "r"), Pair)
