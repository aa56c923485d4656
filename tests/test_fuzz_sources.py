"""Fuzzing the data adapters with malformed rows (hypothesis).

Every row of every format either becomes valid examples or a DataError naming the file
and the row; nothing else escapes (no KeyError/TypeError from deep inside), and with
on_error="skip" every row is accounted for: it gave examples or it is in `skipped`.
"""

import csv
import io
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ulma.data.schema import DataError, Pair, PointWise
from ulma.data.sources import load_source

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

text = st.text(max_size=12)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), text)
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)), max_leaves=6)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]), "content": st.one_of(text, st.none())}), max_size=3)
trl_row = st.dictionaries(
    st.sampled_from(["prompt", "completion", "label", "chosen", "rejected", "messages", "response", "extra"]),
    st.one_of(value, messages), max_size=5,
)
transcript = st.lists(st.tuples(st.sampled_from(["Human", "Assistant", "human", "System"]), text), max_size=4).map(
    lambda turns: "".join(f"\n\n{r}: {c}" for r, c in turns))
hh_row = st.one_of(st.fixed_dictionaries({"chosen": transcript, "rejected": transcript}), st.dictionaries(text, value, max_size=3))
red_row = st.one_of(
    st.fixed_dictionaries({"transcript": transcript, "rating": st.one_of(st.integers(-2, 6), st.floats(), text, st.none())}),
    st.dictionaries(text, value, max_size=3))


def check_examples(examples):
    """Nothing silently wrong: every example is well formed."""
    for e in examples:
        assert e.prompt and e.prompt[-1]["role"] == "user"
        responses = [e.chosen, e.rejected] if isinstance(e, Pair) else [e.response]
        assert all(isinstance(r, str) and r.strip() for r in responses)
        if isinstance(e, PointWise):
            assert math.isfinite(e.label) and (not e.binary or e.label in (0.0, 1.0))


def run_both_modes(source, path, n_rows, **options):
    try:
        strict = load_source(source, str(path), **options)
        check_examples(strict.examples)
    except DataError as err:
        assert str(path) in str(err) and err.row is not None, str(err)
    lenient = load_source(source, str(path), on_error="skip", **options)
    check_examples(lenient.examples)
    for err in lenient.skipped:
        assert isinstance(err, DataError) and str(path) in str(err)
    origins = {e.origin for e in lenient.examples}
    assert len(origins) + len(lenient.skipped) == n_rows


@SETTINGS
@given(rows=st.lists(trl_row, min_size=1, max_size=5), garbage=st.booleans())
def test_jsonl_rows(tmp_path, rows, garbage):
    lines = [json.dumps(r) for r in rows] + (["{not json"] if garbage else [])
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines) + "\n")
    run_both_modes("jsonl", path, len(lines))


@SETTINGS
@given(rows=st.lists(st.dictionaries(st.sampled_from(["prompt", "completion", "label"]), st.one_of(text, st.integers(-3, 3)), max_size=3), min_size=1, max_size=5))
def test_csv_rows(tmp_path, rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["prompt", "completion", "label"])
    w.writeheader()
    for r in rows:
        w.writerow(r)
    path = tmp_path / "fuzz.csv"
    path.write_text(buf.getvalue())
    run_both_modes("csv", path, len(rows))


@SETTINGS
@given(rows=st.lists(hh_row, min_size=1, max_size=5))
def test_hh_rows(tmp_path, rows):
    path = tmp_path / "fuzz_hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_both_modes("hh", path, len(rows))


@SETTINGS
@given(rows=st.lists(red_row, min_size=1, max_size=5))
def test_red_team_rows(tmp_path, rows):
    path = tmp_path / "fuzz_red.json"
    path.write_text(json.dumps(rows))
    run_both_modes("red_team", path, len(rows))


@SETTINGS
@given(records=st.lists(st.dictionaries(st.sampled_from(["question", "passages", "prediction 1", "feedback"]), value, max_size=4), min_size=1, max_size=4))
def test_qa_feedback_records(tmp_path, records):
    path = tmp_path / "fuzz_qa.json"
    path.write_text(json.dumps(records))
    try:
        strict = load_source("qa_feedback", str(path))
        check_examples(strict.examples)
    except DataError as err:
        assert str(path) in str(err) and err.row is not None
    lenient = load_source("qa_feedback", str(path), on_error="skip")
    check_examples(lenient.examples)
    rows_with_examples = {e.origin.rsplit(":", 1)[-1] for e in lenient.examples}
    assert len(rows_with_examples) + len(lenient.skipped) + lenient.stats.get("neither", 0) == len(records)
