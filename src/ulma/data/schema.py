"""One schema for the four kinds of data in the ULMA paper.

- :class:`Demonstration` -- (x, y): a prompt and a good response (SFT, §3.1).
- :class:`PointWise`     -- (x, y, z): one response with a label. ``binary=True`` means
  z in {0, 1} (Eq. 6-8); otherwise z is a continuous score (Eq. 9), higher is better.
- :class:`Pair`          -- (x, y_w, y_l): a chosen and a rejected response (Eq. 1, 5).

A prompt is a tuple of chat turns ``{"role": "system"|"user"|"assistant", "content": str}``
that ends with a user turn; the response is the next assistant turn.  A demonstration
whose prompt is ``()`` is plain text (a ``{"text"}`` row, :func:`text_demonstration`):
rendered without the chat template and trained on every token.  Every example
keeps ``origin`` ("file:line") so that any later error can name where it came from, and a
``weight`` (a number >= 0, default 1): how much its loss counts in the step's mean
(:func:`ulma.losses.group_mean`); a pair's weight goes with both of its halves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad row: names the file, the row (1-based line or record number) and the field."""

    def __init__(self, file: str, row: int | str | None, field_name: str | None, message: str):
        self.file, self.row, self.field, self.message = file, row, field_name, message
        where = f"{file}"
        if row is not None:
            where += f", row {row}"
        if field_name:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {message}")


class Turn(dict):
    """A chat turn {"role", "content"}: a dict (what chat templates take) that is
    immutable and hashable, so prompts can key caches and group examples."""

    def __hash__(self):  # type: ignore[override]
        return hash((self["role"], self["content"]))

    def _immutable(self, *args, **kwargs):
        raise TypeError("chat turns are immutable")

    def __reduce__(self):  # pickling and deepcopy rebuild through __init__, not __setitem__
        return (Turn, (dict(self),))

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _immutable


Prompt = tuple  # tuple[Turn, ...]


def make_prompt(turns: Iterable[dict], *, file: str = "<memory>", row=None, field_name="prompt") -> Prompt:
    """Validate chat turns and freeze them into a hashable tuple of dicts."""
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "role" not in t or "content" not in t:
            raise DataError(file, row, field_name, f"turn {i} must be an object with 'role' and 'content'")
        if t["role"] not in ROLES:
            raise DataError(file, row, field_name, f"turn {i} has unknown role {t['role']!r} (expected one of {ROLES})")
        if not isinstance(t["content"], str):
            raise DataError(file, row, field_name, f"turn {i} content must be a string, got {type(t['content']).__name__}")
        out.append(Turn(role=t["role"], content=t["content"]))
    if not out:
        raise DataError(file, row, field_name, "the prompt is empty")
    if out[-1]["role"] != "user":
        raise DataError(file, row, field_name, f"the prompt must end with a user turn, not {out[-1]['role']!r}")
    return tuple(out)


def user_prompt(text: str, system: str | None = None) -> Prompt:
    """A one-turn prompt (plus an optional system turn)."""
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return make_prompt(turns)


def _check_response(text, file, row, field_name, what="the response"):
    if not isinstance(text, str):
        raise DataError(file, row, field_name, f"must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(file, row, field_name, f"{what} is empty")
    return text


@dataclass(frozen=True)
class Demonstration:
    prompt: Prompt  # () for plain text: no chat template, every token trained on
    response: str
    origin: str = "<memory>"
    weight: float = 1.0
    kind: str = field(default="demonstration", init=False)


@dataclass(frozen=True)
class PointWise:
    prompt: Prompt
    response: str
    label: float
    binary: bool = True
    origin: str = "<memory>"
    weight: float = 1.0
    kind: str = field(default="pointwise", init=False)


@dataclass(frozen=True)
class Pair:
    prompt: Prompt
    chosen: str
    rejected: str
    origin: str = "<memory>"
    weight: float = 1.0
    kind: str = field(default="pair", init=False)


Example = Union[Demonstration, PointWise, Pair]


def demonstration(prompt, response, *, file="<memory>", row=None, weight=1.0) -> Demonstration:
    """Build a validated :class:`Demonstration`."""
    return Demonstration(
        make_prompt(prompt, file=file, row=row), _check_response(response, file, row, "response"), _origin(file, row),
        check_weight(weight, file, row),
    )


def text_demonstration(text, *, file="<memory>", row=None, field_name="text", weight=1.0) -> Demonstration:
    """Plain text (TRL's ``{"text"}`` format) as a :class:`Demonstration` with an empty prompt:
    tokenized without the chat template (the tokenizer's BOS, if it adds one, the text, EOS)
    and trained on every token, as in pre-training."""
    text = _check_response(text, file, row, field_name, "the text")
    return Demonstration((), text, _origin(file, row), check_weight(weight, file, row))


def pointwise(
    prompt, response, label, *, binary: bool, file="<memory>", row=None, label_range=None, weight=1.0
) -> PointWise:
    """Build a validated :class:`PointWise` example.

    ``binary`` labels must be 0/1 (or True/False); continuous labels must be finite numbers,
    inside ``label_range=(lo, hi)`` when one is given.
    """
    z = _check_label(label, binary, file, row, label_range)
    return PointWise(
        make_prompt(prompt, file=file, row=row), _check_response(response, file, row, "response"), z, binary,
        _origin(file, row), check_weight(weight, file, row),
    )


def pair(prompt, chosen, rejected, *, file="<memory>", row=None, weight=1.0) -> Pair:
    """Build a validated :class:`Pair`."""
    return Pair(
        make_prompt(prompt, file=file, row=row),
        _check_response(chosen, file, row, "chosen"),
        _check_response(rejected, file, row, "rejected"),
        _origin(file, row),
        check_weight(weight, file, row),
    )


def _origin(file, row) -> str:
    return f"{file}:{row}" if row is not None else str(file)


def check_weight(weight, file="<memory>", row=None, field_name="weight") -> float:
    """A finite number >= 0 (an example of weight 0 is kept but does not count)."""
    import math

    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise DataError(file, row, field_name, f"must be a number >= 0, got {weight!r}")
    w = float(weight)
    if not (math.isfinite(w) and w >= 0):
        raise DataError(file, row, field_name, f"must be a finite number >= 0, got {weight!r}")
    return w


def _check_label(label, binary, file, row, label_range) -> float:
    import math

    if isinstance(label, bool):
        return float(label)
    if isinstance(label, str) or label is None or not isinstance(label, (int, float)):
        raise DataError(file, row, "label", f"must be a number, got {label!r}")
    z = float(label)
    if not math.isfinite(z):
        raise DataError(file, row, "label", f"must be finite, got {label!r}")
    if binary and z not in (0.0, 1.0):
        raise DataError(file, row, "label", f"a binary label must be 0 or 1, got {label!r}")
    if label_range is not None and not (label_range[0] <= z <= label_range[1]):
        raise DataError(file, row, "label", f"{label!r} is outside the allowed range {list(label_range)}")
    return z


# ---------------------------------------------------------------- converters between kinds


def pairs_to_pointwise(pairs: Iterable[Pair]) -> list[PointWise]:
    """Each pair becomes two binary point-wise examples: chosen z=1, rejected z=0 (paper §5.1)."""
    out: list[PointWise] = []
    for p in pairs:
        out.append(PointWise(p.prompt, p.chosen, 1.0, True, p.origin, p.weight))
        out.append(PointWise(p.prompt, p.rejected, 0.0, True, p.origin, p.weight))
    return out


def pointwise_to_demonstrations(examples: Iterable[PointWise], threshold: float | None = None) -> list[Demonstration]:
    """The positives as demonstrations.

    Binary data: z == 1.  Continuous data: z >= ``threshold``; without one, the best-rated
    score in the data (e.g. red-team rating 0 mapped to score 1).
    """
    examples = list(examples)
    if threshold is None:
        threshold = positive_threshold(examples)
    return [Demonstration(e.prompt, e.response, e.origin, e.weight) for e in examples if e.label >= threshold]


def positive_threshold(examples: Sequence[PointWise]) -> float:
    """The label at or above which an example counts as positive: 1 for binary data,
    the highest score present for continuous data (the authors' rule: positive iff best-rated)."""
    if not examples:
        return 1.0
    if all(e.binary for e in examples):
        return 1.0
    return max(e.label for e in examples)


def as_kind(examples: Sequence[Example], kind: str) -> list:
    """Convert a list of examples to ``kind`` ('pointwise', 'demonstration' or 'pair').

    Pairs -> point-wise and point-wise -> demonstrations are lossless reductions; a
    request that would need to invent data (point-wise -> pairs) raises ``ValueError``.
    """
    kinds = {e.kind for e in examples}
    if kinds <= {kind}:
        return list(examples)
    if kind == "pointwise":
        out = []
        for e in examples:
            if e.kind == "pair":
                out.extend(pairs_to_pointwise([e]))
            elif e.kind == "pointwise":
                out.append(e)
            else:  # a demonstration is a positive with label 1
                out.append(PointWise(e.prompt, e.response, 1.0, True, e.origin, e.weight))
        return out
    if kind == "demonstration":
        pw = as_kind(examples, "pointwise")
        return pointwise_to_demonstrations(pw)
    if kind == "pair":
        raise ValueError(
            f"this method needs pairs but the data holds {sorted(kinds)}; use a point-wise method "
            "(pointwise_dpo, ulma) or build pairs with ulma.data.schema.pointwise_to_pairs"
        )
    raise ValueError(f"unknown kind {kind!r}")


def pointwise_to_pairs(examples: Iterable[PointWise]) -> list[Pair]:
    """Pairs from point-wise examples that share a prompt: every (higher, lower) score combination.

    Used for held-out implicit-reward accuracy on point-wise data (e.g. PyRIT scores); the
    pairs built have weight 1.
    """
    by_prompt: dict = {}
    for e in examples:
        by_prompt.setdefault(e.prompt, []).append(e)
    out = []
    for prompt, group in by_prompt.items():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if a.label == b.label:
                    continue
                hi, lo = (a, b) if a.label > b.label else (b, a)
                out.append(Pair(prompt, hi.response, lo.response, f"{hi.origin}|{lo.origin}"))
    return out
