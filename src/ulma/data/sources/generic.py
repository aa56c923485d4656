"""Users' own files: ``jsonl`` (alias ``trl``), ``json``, ``csv``, ``parquet`` and ``hf``.

Recognised unchanged (TRL's data formats), standard or conversational:

=====================================  ===========================  =====================
columns                                kind                         example
=====================================  ===========================  =====================
prompt, completion (or response)       demonstration                Demonstration
prompt, completion, label              binary (0/1/bool) or         PointWise
                                       continuous (other numbers)
prompt, chosen, rejected               pair                         Pair
messages [, label]                     demonstration / point-wise   last assistant turn =
                                                                    response, rest = prompt
text                                   demonstration (plain text)   Demonstration, empty
                                                                    prompt
=====================================  ===========================  =====================

- ``prompt``: a string (one user turn) or a list of ``{"role", "content"}`` messages
  ending with a user turn.  An optional ``system`` column adds a system turn first.
- ``completion`` / ``response`` / ``chosen`` / ``rejected``: a string, or a list holding
  one assistant message.  Without a ``prompt`` column, conversational ``chosen`` and
  ``rejected`` lists may carry the prompt themselves (TRL's implicit prompt): every message
  but the last is the prompt, and the two must agree.
- ``messages``: a conversation whose last message is the assistant response.
- ``text``: plain text (TRL's language-modeling format), read only from a row with none of
  the columns above: a demonstration with an empty prompt, tokenized without the chat
  template (BOS where the tokenizer adds one, the text, EOS) and trained on every token.
  Text rows cannot be labelled or paired.
- ``weight`` (any kind, optional): a number >= 0 that scales the row's loss in the step's
  mean (a weighted mean per group: sum of w*loss / sum of w); absent, null or NaN (a
  missing cell of a DataFrame): 1.  A pair's weight counts for both of its responses when
  it is trained on as point-wise data.
- In CSV files every cell is text: a prompt/response cell holding a JSON list of messages
  is decoded; labels ``true``/``false`` are booleans, other labels are parsed as numbers.

Options (all sources):

- ``columns``: our field -> your column name, fields ``prompt, response, label, chosen,
  rejected, messages, system, text, weight``;
  e.g. ``columns={"prompt": "question", "response": "answer"}``.
- ``kind``: ``"demonstration" | "binary" | "continuous" | "pair"``.  Inferred when absent,
  from the columns found in any row: chosen and rejected -> pair; a label column -> binary
  when every numeric label is 0, 1 or a boolean, else continuous; otherwise demonstration.
- ``label_range``: ``(lo, hi)``, the allowed range of continuous labels.
- ``hf`` only: ``name`` (required; a hub id or a builder such as "json"), ``data_dir``,
  ``data_files``, ``split`` (default "train"), ``cache_dir``.

Bad rows (DataError naming file, row and field): a line that is not JSON (field None,
"invalid JSON"), a missing column (the column is named), an empty response or text, a label
that is not a number ("yes", null) or not 0/1 for binary data, a score outside ``label_range``,
a ``text`` row in labelled or paired data, a weight that is not a finite number >= 0.
"""

from __future__ import annotations

import json
import math

from ulma.data.schema import DataError, check_weight, demonstration, pair, pointwise, text_demonstration

from ._common import (
    LoadResult,
    Rows,
    check_choice,
    check_options,
    iter_csv,
    iter_hub,
    iter_json_array,
    iter_jsonl,
    iter_parquet,
    load_hub,
)

FIELDS = ("prompt", "response", "label", "chosen", "rejected", "messages", "system", "text", "weight")
DEFAULT_COLUMNS = {f: (f,) for f in FIELDS} | {"response": ("completion", "response")}
CONTENT_FIELDS = ("prompt", "response", "chosen", "rejected", "messages")  # a row with one is not plain text
KINDS = ("demonstration", "binary", "continuous", "pair")
COMMON_OPTIONS = {"columns", "kind", "label_range"}
HF_OPTIONS = {"name", "data_dir", "data_files", "split", "cache_dir"}


class Spec:
    """How to read the rows of one file: column names, kind, label range, CSV cells."""

    def __init__(self, source: str, options: dict, csv_cells: bool = False):
        self.columns = _columns(source, options.get("columns"))
        self.kind = options.get("kind")
        if self.kind is not None:
            check_choice(source, "kind", self.kind, KINDS)
        self.label_range = _label_range(source, options.get("label_range"))
        self.csv_cells = csv_cells

    def find(self, record: dict, field: str):
        """(column, value) of ``field`` in ``record``; (None, None) when absent."""
        for col in self.columns[field]:
            if col in record:
                return col, _decode_cell(field, record[col]) if self.csv_cells else record[col]
        return None, None

    def need(self, record: dict, field: str, file, row):
        col, value = self.find(record, field)
        if col is None:
            names = self.columns[field]
            where = names[0] if len(names) == 1 else field
            raise DataError(file, row, where, "missing column " + " or ".join(repr(n) for n in names))
        return value


def _columns(source, mapping) -> dict:
    mapping = mapping or {}
    if not isinstance(mapping, dict):
        raise ValueError(f"source {source!r}: option 'columns' must be a dict of field -> column name")
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"source {source!r}: unknown field(s) {unknown} in 'columns'; valid fields: {', '.join(FIELDS)}"
        )
    return {f: (mapping[f],) if f in mapping else DEFAULT_COLUMNS[f] for f in FIELDS}


def _label_range(source, value):
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"source {source!r}: 'label_range' must be two numbers (lo, hi), got {value!r}") from None
    if not lo <= hi:
        raise ValueError(f"source {source!r}: 'label_range' needs lo <= hi, got {value!r}")
    return (lo, hi)


def _decode_cell(field: str, value):
    """CSV text -> value: JSON message lists for text fields, booleans/numbers for labels."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if field == "weight":
        try:
            return float(text) if text else None
        except ValueError:
            return value
    if field == "label":
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        try:
            return float(text) if text else None
        except ValueError:
            return value
    if field not in ("system", "text") and text.startswith("[{"):
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, list) and all(isinstance(t, dict) for t in decoded) else value
    return value


# ------------------------------------------------------------------------------ kind inference


def infer_kind(records: list, spec: Spec) -> str:
    """The kind of a list of records (see the module docstring)."""
    if spec.kind is not None:
        return spec.kind
    dicts = [r for r in records if isinstance(r, dict)]
    has = {f: any(spec.find(r, f)[0] is not None for r in dicts) for f in ("chosen", "rejected", "label")}
    if has["chosen"] and has["rejected"]:
        return "pair"
    if not has["label"]:
        return "demonstration"
    labels = [spec.find(r, "label")[1] for r in dicts]
    numbers = [z for z in labels if isinstance(z, (int, float)) and not isinstance(z, bool)]
    return "binary" if all(z in (0, 1) for z in numbers) else "continuous"


# ------------------------------------------------------------------------------ row conversion


def _reply(value, field, file, row, *, allow_context: bool):
    """(context messages, reply text) of a string or a message list ending with an assistant turn."""
    if isinstance(value, str):
        return None, value
    if not isinstance(value, list) or not value:
        raise DataError(file, row, field, "must be a string or a non-empty list of messages")
    last = value[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise DataError(file, row, field, "the last message must be an assistant message")
    if len(value) > 1 and not allow_context:
        raise DataError(file, row, field, f"expected one assistant message, got {len(value)} messages")
    return value[:-1], last.get("content")


def _prompt(record, spec, file, row) -> list:
    value = spec.need(record, "prompt", file, row)
    if isinstance(value, str):
        turns = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        turns = list(value)
    else:
        raise DataError(file, row, spec.columns["prompt"][0], "must be a string or a list of messages")
    return _with_system(turns, record, spec, file, row)


def _with_system(turns, record, spec, file, row) -> list:
    col, system = spec.find(record, "system")
    if (
        col is None
        or system in (None, "")
        or (turns and isinstance(turns[0], dict) and turns[0].get("role") == "system")
    ):
        return turns
    if not isinstance(system, str):
        raise DataError(file, row, col, "must be a string")
    return [{"role": "system", "content": system}] + turns


def _prompt_response(record, spec, file, row):
    """(prompt turns, response text) from prompt + completion/response, or from messages."""
    if spec.find(record, "prompt")[0] is None and spec.find(record, "messages")[0] is not None:
        messages = spec.need(record, "messages", file, row)
        context, response = _reply(messages, spec.columns["messages"][0], file, row, allow_context=True)
        return _with_system(context, record, spec, file, row), response
    prompt = _prompt(record, spec, file, row)
    _, response = _reply(spec.need(record, "response", file, row), "response", file, row, allow_context=False)
    return prompt, response


def _pair_row(record, spec, file, row) -> list:
    has_prompt = spec.find(record, "prompt")[0] is not None
    sides = [
        _reply(spec.need(record, f, file, row), f, file, row, allow_context=not has_prompt)
        for f in ("chosen", "rejected")
    ]
    (context, chosen), (other, rejected) = sides
    if has_prompt:
        prompt = _prompt(record, spec, file, row)
    elif context:
        if context != other:
            raise DataError(file, row, "rejected", "its prompt messages differ from those of 'chosen'")
        prompt = _with_system(context, record, spec, file, row)
    else:
        prompt = _prompt(record, spec, file, row)  # raises: missing column 'prompt'
    return [pair(prompt, chosen, rejected, file=file, row=row, weight=_weight(record, spec, file, row))]


def _text_row(record, spec, kind, file, row) -> list | None:
    """[plain-text demonstration] of a row with ``text`` and no other content column; else None."""
    col, text = spec.find(record, "text")
    if col is None or any(spec.find(record, f)[0] is not None for f in CONTENT_FIELDS):
        return None
    if kind != "demonstration":
        raise DataError(file, row, col, f"a text row is a demonstration (trained on all its tokens), but this "
                        f"data is {kind}: labelled or paired data needs a prompt (prompt/completion or messages)")
    weight = _weight(record, spec, file, row)
    return [text_demonstration(text, file=file, row=row, field_name=col, weight=weight)]


def convert_row(record, spec: Spec, kind: str, file, row) -> list:
    """One record -> [example] of ``kind``."""
    if not isinstance(record, dict):
        raise DataError(file, row, None, f"expected an object, got {type(record).__name__}")
    if (text := _text_row(record, spec, kind, file, row)) is not None:
        return text
    if kind == "pair":
        return _pair_row(record, spec, file, row)
    prompt, response = _prompt_response(record, spec, file, row)
    weight = _weight(record, spec, file, row)
    if kind == "demonstration":
        return [demonstration(prompt, response, file=file, row=row, weight=weight)]
    label = spec.need(record, "label", file, row)
    if isinstance(label, float) and math.isnan(label):
        label = None  # pandas / parquet missing value
    binary = kind == "binary"
    return [pointwise(prompt, response, label, binary=binary, file=file, row=row, label_range=spec.label_range,
                      weight=weight)]


def _weight(record, spec, file, row) -> float:
    """The row's ``weight``: 1 when the column is absent or the cell is missing (null, or a
    pandas NaN)."""
    col, value = spec.find(record, "weight")
    if col is None or value is None or (isinstance(value, float) and math.isnan(value)):
        return 1.0
    return check_weight(value, file, row, col)


# ------------------------------------------------------------------------------ loaders


def _load(file, numbered_records, spec, on_error) -> LoadResult:
    records = list(numbered_records)
    rows = Rows(on_error)
    kind = infer_kind([r for _, r in records], spec)
    for n, record in records:
        rows.add(convert_row, record, spec, kind, file, n)
    rows.result.stats = {"kind": kind}
    return rows.result


def _need_path(source, path):
    if path is None:
        raise ValueError(f"source {source!r} needs path= to a file")
    return path


def load_jsonl(path=None, *, on_error: str = "raise", **options) -> LoadResult:
    """A JSONL (.gz) file, one record per line (TRL's formats)."""
    check_options("jsonl", options, COMMON_OPTIONS)
    return _load(str(path), iter_jsonl(_need_path("jsonl", path)), Spec("jsonl", options), on_error)


def load_json(path=None, *, on_error: str = "raise", **options) -> LoadResult:
    """A JSON (.gz) file holding one array of records."""
    check_options("json", options, COMMON_OPTIONS)
    return _load(str(path), iter_json_array(_need_path("json", path)), Spec("json", options), on_error)


def load_csv(path=None, *, on_error: str = "raise", **options) -> LoadResult:
    """A CSV (.gz) file with a header line."""
    check_options("csv", options, COMMON_OPTIONS)
    spec = Spec("csv", options, csv_cells=True)
    return _load(str(path), iter_csv(_need_path("csv", path)), spec, on_error)


def load_parquet(path=None, *, on_error: str = "raise", **options) -> LoadResult:
    """A parquet file."""
    check_options("parquet", options, COMMON_OPTIONS)
    return _load(str(path), iter_parquet(_need_path("parquet", path)), Spec("parquet", options), on_error)


def load_hf(path=None, *, on_error: str = "raise", **options) -> LoadResult:
    """Any ``datasets.load_dataset`` source: option ``name``, or ``path`` used as the name."""
    check_options("hf", options, COMMON_OPTIONS | HF_OPTIONS)
    name = options.get("name") or path
    if not name:
        raise ValueError("source 'hf' needs the option name= (a hub id, or a builder such as 'json')")
    split = options.get("split", "train")
    if not isinstance(split, str):
        raise ValueError(f"source 'hf': option 'split' must be a split name such as 'train', got {split!r}")
    hub = {k: options.get(k) for k in ("data_dir", "data_files", "cache_dir")}
    dataset = load_hub("hf", name, split=split, **hub)
    spec = Spec("hf", {k: v for k, v in options.items() if k in COMMON_OPTIONS})
    return _load(f"hf:{name}[{split}]", iter_hub(dataset), spec, on_error)


def load_records(records, *, name: str = "<rows>", on_error: str = "raise", **options) -> LoadResult:
    """Rows already in memory (a list of dicts, a ``datasets.Dataset``, a pandas DataFrame)
    in any format this module reads; errors name ``name`` and the 1-based row."""
    check_options(name, options, COMMON_OPTIONS)
    if hasattr(records, "to_dict") and hasattr(records, "columns"):  # a pandas DataFrame
        records = records.to_dict("records")
    return _load(name, enumerate((dict(r) if isinstance(r, dict) else r for r in records), 1),
                 Spec(name, options), on_error)
