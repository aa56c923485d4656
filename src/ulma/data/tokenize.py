"""The ONE place where examples become token ids and batches.

Every example is rendered with the model's chat template: the prompt turns with the
generation prompt appended, then the response followed by EOS.  The loss is taken on
response tokens only.  When prompt + response exceed ``max_length`` the prompt is cut
from the left (the most recent turns are kept) and, only if the response alone is too
long, the response is cut at its end; both are counted.

Sequences live in a table (:class:`SequenceTable`); a training *unit* is a tuple of row
indices into it: one row for point-wise data and demonstrations, two (chosen, rejected)
for pairs.  Pairs share the prompt, and duplicated (prompt, response) rows are stored once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ulma.data.schema import Example, PointWise, positive_threshold

# Used when a tokenizer has no chat template (base models): a plain HH-style transcript.
_FALLBACK_ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}


def render_prompt(tokenizer, prompt) -> str:
    """The prompt turns as text, ending where the assistant's reply starts."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    text = "".join(f"\n\n{_FALLBACK_ROLES[t['role']]}: {t['content']}" for t in prompt)
    return text + "\n\nAssistant:"


def response_suffix(tokenizer) -> list[int]:
    """Token ids that close a response: EOS (for ChatML models EOS is ``<|im_end|>``)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set one (tokenizer.eos_token = ...)")
    return [tokenizer.eos_token_id]


@dataclass
class Sequence:
    input_ids: list[int]
    n_prompt: int  # the first n_prompt tokens are the prompt; the rest is response + EOS
    origin: str = ""


def packed_width(seqs: list[Sequence]) -> int:
    """Tokens of rows that share one prompt when it is counted once: the width of their
    packed row [prompt, response_1, ...] (logprobs.pack_prompts)."""
    n = seqs[0].n_prompt
    return n + sum(len(s.input_ids) - n for s in seqs)


@dataclass
class SequenceTable:
    """Unique tokenized (prompt, response) sequences plus the statistics of truncation."""

    sequences: list[Sequence] = field(default_factory=list)
    prompt_truncated: int = 0
    response_truncated: int = 0
    _index: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.sequences)

    def lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.sequences]


class Tokenizer:
    """Turns examples into rows of a :class:`SequenceTable` (prompt encodings are cached)."""

    def __init__(self, tokenizer, max_length: int):
        self.tok = tokenizer
        self.max_length = max_length
        self._prompt_cache: dict = {}
        self._suffix = response_suffix(tokenizer)

    def encode_prompt(self, prompt) -> list[int]:
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            ids = self.tok(render_prompt(self.tok, prompt), add_special_tokens=False)["input_ids"]
            self._prompt_cache[prompt] = ids
        return ids

    def encode_response(self, response: str) -> list[int]:
        return self.tok(response, add_special_tokens=False)["input_ids"] + self._suffix

    def add(self, table: SequenceTable, prompt, response: str, origin: str = "", partner: int = 0) -> int:
        """Tokenize (prompt, response) into ``table`` (once) and return its row index.

        ``partner``: the token count of the other response of a pair; the prompt is cut as
        for the longer of the two (:meth:`add_pair`).
        """
        if not partner and (prompt, response, 0) in table._index:
            return table._index[(prompt, response, 0)]
        p, r = self.encode_prompt(prompt), self.encode_response(response)
        partner = partner if partner > len(r) else 0  # the longer one is cut as if alone
        key = (prompt, response, partner)
        if key in table._index:
            return table._index[key]
        ids, n_prompt, cut_p, cut_r = fit(p, r, self.max_length, partner=partner)
        table.prompt_truncated += cut_p
        table.response_truncated += cut_r
        table.sequences.append(Sequence(ids, n_prompt, origin))
        table._index[key] = len(table.sequences) - 1
        return table._index[key]

    def add_pair(self, table: SequenceTable, prompt, chosen: str, rejected: str, origin: str = "") -> tuple[int, int]:
        """Both rows of a pair, with the prompt cut alike: DPO compares pi(y_w|x) with
        pi(y_l|x) for one x (Eq. 3), and a batch then runs that x once (logprobs.pack_prompts)."""
        lc, lr = len(self.encode_response(chosen)), len(self.encode_response(rejected))
        return (self.add(table, prompt, chosen, origin, partner=lr), self.add(table, prompt, rejected, origin, partner=lc))


def fit(prompt_ids: list[int], response_ids: list[int], max_length: int, min_prompt: int = 8, partner: int = 0):
    """Join prompt and response within ``max_length``.

    The prompt loses tokens from its left; if the response alone leaves less than
    ``min_prompt`` prompt tokens (at most half of ``max_length``), the response loses
    tokens from its right.  ``partner`` (a pair's other response, in tokens): the prompt
    is cut to leave room for the longer of the two, so both rows keep the same prompt.
    Returns (ids, n_prompt, prompt_was_cut, response_was_cut).
    """
    room_for_response = max_length - min(min_prompt, len(prompt_ids), max_length // 2)
    cut_r = len(response_ids) > room_for_response
    if cut_r:
        response_ids = response_ids[:room_for_response]
    room_for_prompt = max_length - max(len(response_ids), min(partner, room_for_response))
    cut_p = len(prompt_ids) > room_for_prompt
    if cut_p:
        prompt_ids = prompt_ids[len(prompt_ids) - room_for_prompt :]
    return prompt_ids + response_ids, len(prompt_ids), int(cut_p), int(cut_r)


# ---------------------------------------------------------------------- units


@dataclass
class Units:
    """What one method trains on: rows of a table grouped into units, with labels.

    ``rows[i]`` is ``(row,)`` or ``(chosen_row, rejected_row)``; ``labels[i]`` is z
    (1 for demonstrations and pairs); ``positive[i]`` says whether the unit counts as a
    positive for the balanced reduction and the positive/negative loss split.
    """

    table: SequenceTable
    rows: list[tuple] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)
    positive: list[bool] = field(default_factory=list)
    binary: bool = True

    def __len__(self) -> int:
        return len(self.rows)

    def length(self, i: int, packed: bool = False) -> int:
        """Tokens of unit i's longest row; ``packed``: of its rows with their common prompt
        counted once (a pair's width when its prompt runs once, logprobs.pack_prompts)."""
        seqs = [self.table.sequences[r] for r in self.rows[i]]
        longest = max(len(s.input_ids) for s in seqs)
        if not packed or len(seqs) == 1:
            return longest
        n = seqs[0].n_prompt
        if any(s.n_prompt != n or s.input_ids[:n] != seqs[0].input_ids[:n] for s in seqs[1:]):
            return longest  # prompts differ: not packed together
        return packed_width(seqs)


def build_units(
    examples: list[Example], tokenizer: Tokenizer, threshold: float | None = None, table: SequenceTable | None = None
) -> Units:
    """Tokenize examples of ONE kind into units (pairs stay pairs), adding rows to ``table``."""
    table = SequenceTable() if table is None else table
    units = Units(table)
    pw = [e for e in examples if isinstance(e, PointWise)]
    units.binary = all(e.binary for e in pw)
    thr = threshold if threshold is not None else positive_threshold(pw)
    for e in examples:
        if e.kind == "pair":
            rows = tokenizer.add_pair(table, e.prompt, e.chosen, e.rejected, e.origin)
            z = 1.0
        else:
            rows = (tokenizer.add(table, e.prompt, e.response, e.origin),)
            z = e.label if e.kind == "pointwise" else 1.0
        units.rows.append(rows)
        units.labels.append(float(z))
        units.positive.append(e.kind != "pointwise" or e.label >= thr)
    return units


# ---------------------------------------------------------------------- batches


def collate(units: Units, idx: list[int], pad_id: int, ref: dict | None = None) -> dict:
    """Pad the units ``idx`` into one batch (right padding).

    Pairs are flattened as [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}].
    Returns tensors: input_ids [N, T] long, attention_mask [N, T] long, loss_mask [N, T]
    bool (True on response tokens, aligned with input_ids), labels [B] float,
    positive [B] bool, and ref_sum / ref_count [N] when ``ref`` holds precomputed
    reference sums per table row.
    """
    cols = list(zip(*[units.rows[i] for i in idx]))  # one tuple per position in the unit
    rows = [r for col in cols for r in col]
    batch = pad_rows(units.table, rows, pad_id)
    batch["labels"] = torch.tensor([units.labels[i] for i in idx], dtype=torch.float32)
    batch["positive"] = torch.tensor([units.positive[i] for i in idx], dtype=torch.bool)
    if ref is not None:
        batch["ref_sum"] = ref["sum"][rows]
        batch["ref_count"] = ref["count"][rows]
    return batch


def pad_rows(table: SequenceTable, rows: list[int], pad_id: int) -> dict:
    seqs = [table.sequences[r] for r in rows]
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        loss_mask[i, s.n_prompt : n] = True
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "rows": torch.tensor(rows)}


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [N, P], attention_mask [N, P]) padded on the LEFT, for generation: a
    decoder-only model continues from the last position, which must be a real token."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        attn[i, width - len(s) :] = 1
    return ids, attn
