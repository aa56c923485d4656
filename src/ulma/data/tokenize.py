"""The ONE place where examples become token ids and batches.

Every example is rendered with the model's chat template: the prompt turns with the
generation prompt appended, then the response followed by the end-of-turn token the
template writes after an assistant message (:func:`response_suffix`: ChatML's
``<|im_end|>``, Llama-3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``; EOS without a
template).  The loss is taken on response tokens only.  An example with an empty prompt
(a ``{"text"}`` row) is plain text: no template, the tokenizer's own start (BOS where it
adds one) as its prompt, then the text and EOS, all of it scored.  When prompt + response
exceed ``max_length`` the prompt is cut from the left (the most recent turns are kept)
and, only if the response alone is too long, the response is cut at its end; both are
counted.

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


# An assistant message rendered through the chat template to see what the template writes
# after a reply; letters only, so no template's ``| trim`` or tokenizer touches it.
_SENTINEL = "ULMASENTINELREPLY"


def response_suffix(tokenizer) -> list[int]:
    """Token ids that close a response: what the chat template writes right after an
    assistant message, up to and including its first special token, the end-of-turn marker
    that generation stops on (ChatML ``<|im_end|>``, Llama-3 ``<|eot_id|>``, Gemma
    ``<end_of_turn>``).  The newline some templates write after that marker is not part of
    the response: it opens the next turn, and generation never reaches it.  Without a
    template, or when the template writes no special token after a reply: ``[EOS]``."""
    suffix = _template_suffix(tokenizer)
    return suffix if suffix else [eos_id(tokenizer)]


def stop_tokens(tokenizer) -> set[int]:
    """Ids that end a generated response: the end-of-turn token training puts after every
    response (the last of :func:`response_suffix`) and EOS, where the tokenizer has them."""
    ids = {tokenizer.eos_token_id}
    try:
        ids.add(response_suffix(tokenizer)[-1])
    except ValueError:  # neither an end-of-turn token nor EOS
        pass
    return {i for i in ids if i is not None}


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set one (tokenizer.eos_token = ...)")
    return tokenizer.eos_token_id


def _template_suffix(tokenizer) -> list[int] | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception as err:  # jinja's own errors, raise_exception() of the template
        raise ValueError(f"the chat template cannot render a user turn and an assistant reply: {err}") from err
    if _SENTINEL not in text:
        return None
    after = text[text.rindex(_SENTINEL) + len(_SENTINEL) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    for k, t in enumerate(ids):
        if t in special:
            return ids[: k + 1]
    return None


def text_prefix(tokenizer) -> list[int]:
    """What the tokenizer puts before plain text when it adds its special tokens: ``[BOS]``
    for Llama and Gemma, nothing for ChatML models.  The "prompt" of a ``{"text"}`` row."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return full[:k]
    return []


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


def packed_shape(n_rows: int, width: int, group_widths: list[int], hidden: int = 0,
                 multiple: int = 1) -> tuple[int, int] | None:
    """(rows, width) of a batch of ``n_rows`` rows padded to ``width`` when run as one packed
    row per distinct prompt (``group_widths``: each prompt plus its rows' responses,
    logprobs.pack_prompts), the width rounded up to ``multiple``; None when packing would
    not shrink the batch's cost: per row, width x 6 x ``hidden`` for the matrix products
    (12 h^2 multiply-adds a token against attention's 2 x width x h) plus width^2 for
    attention; ``hidden`` 0 counts tokens only.  Long packed rows make attention's quadratic
    part grow."""
    w = round_up(max(group_widths), multiple)
    cost = lambda rows, wide: rows * wide * (6 * hidden + wide if hidden else 1)  # noqa: E731
    if len(group_widths) == n_rows or cost(len(group_widths), w) >= cost(n_rows, width):
        return None
    return len(group_widths), w


def forward_shape(seqs: list[Sequence], share_prompts: bool = False, hidden: int = 0,
                  multiple: int = 1) -> tuple[int, int]:
    """(rows, width) of the forward pass that runs ``seqs`` as one batch: right-padded to the
    longest (:func:`pad_rows`) or, with ``share_prompts``, packed one row per distinct prompt
    where logprobs.pack_prompts packs them (every row has a prompt and a response)."""
    width = round_up(max(len(s.input_ids) for s in seqs), multiple)
    if share_prompts and all(0 < s.n_prompt < len(s.input_ids) for s in seqs):
        groups: dict = {}
        for s in seqs:
            groups.setdefault(tuple(s.input_ids[: s.n_prompt]), []).append(s)
        packed = packed_shape(len(seqs), width, [packed_width(g) for g in groups.values()], hidden, multiple)
        if packed is not None:
            return packed
    return len(seqs), width


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
        """The rendered prompt; an empty prompt (plain text) is :func:`text_prefix`."""
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            if prompt:
                ids = self.tok(render_prompt(self.tok, prompt), add_special_tokens=False)["input_ids"]
            else:
                ids = text_prefix(self.tok)
            self._prompt_cache[prompt] = ids
        return ids

    def encode_response(self, response: str, text: bool = False) -> list[int]:
        """The response and its end-of-turn tokens; ``text``: plain text, closed by EOS."""
        end = [eos_id(self.tok)] if text else self._suffix
        return self.tok(response, add_special_tokens=False)["input_ids"] + end

    def add(self, table: SequenceTable, prompt, response: str, origin: str = "", partner: int = 0) -> int:
        """Tokenize (prompt, response) into ``table`` (once) and return its row index.

        ``partner``: the token count of the other response of a pair; the prompt is cut as
        for the longer of the two (:meth:`add_pair`).
        """
        if not partner and (prompt, response, 0) in table._index:
            return table._index[(prompt, response, 0)]
        p, r = self.encode_prompt(prompt), self.encode_response(response, text=not prompt)
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
    positive for the balanced reduction and the positive/negative loss split;
    ``weights[i]`` is the example's weight (empty list: every weight is 1).
    """

    table: SequenceTable
    rows: list[tuple] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)
    positive: list[bool] = field(default_factory=list)
    binary: bool = True
    weights: list[float] = field(default_factory=list)
    kl_rows: list[int] = field(default_factory=list)  # per unit, its mismatched (x_i, y_j) row (KTO); empty: none

    def __len__(self) -> int:
        return len(self.rows)

    def weight(self, i: int) -> float:
        return self.weights[i] if self.weights else 1.0

    def group_weights(self, idx) -> tuple[float, float]:
        """(positives, negatives) among units ``idx``, each unit counted by its weight: the
        ``n_pos`` / ``n_neg`` of :func:`ulma.losses.group_mean` (the counts when all weights are 1)."""
        pos = sum(self.weight(i) for i in idx if self.positive[i])
        return pos, sum(self.weight(i) for i in idx) - pos

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

    def batch_rows(self, idx: list[int]) -> list[int]:
        """The table rows of a batch of units ``idx``, in :func:`collate`'s order."""
        cols = list(zip(*[self.rows[i] for i in idx]))  # one tuple per position in the unit
        return [r for col in cols for r in col] + [self.kl_rows[i] for i in idx if self.kl_rows]


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
        units.weights.append(e.weight)
        units.labels.append(float(z))
        units.positive.append(e.kind != "pointwise" or e.label >= thr)
    return units


# ---------------------------------------------------------------------- batches


def collate(units: Units, idx: list[int], pad_id: int, ref: dict | None = None, multiple: int = 1) -> dict:
    """Pad the units ``idx`` into one batch (right padding, to a width that is a multiple of
    ``multiple``: :func:`pad_rows`).

    Pairs are flattened as [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]; units with
    ``kl_rows`` get their mismatched rows last, [unit rows..., kl_0..kl_{B-1}].
    Returns tensors: input_ids [N, T] long, attention_mask [N, T] long, loss_mask [N, T]
    bool (True on response tokens, aligned with input_ids), labels [B] float,
    positive [B] bool, weight [B] float, and ref_sum / ref_count [N] when ``ref`` holds
    precomputed reference sums per table row.
    """
    rows = units.batch_rows(idx)
    batch = pad_rows(units.table, rows, pad_id, multiple)
    batch["labels"] = torch.tensor([units.labels[i] for i in idx], dtype=torch.float32)
    batch["positive"] = torch.tensor([units.positive[i] for i in idx], dtype=torch.bool)
    batch["weight"] = torch.tensor([units.weight(i) for i in idx], dtype=torch.float32)
    if ref is not None:
        batch["ref_sum"] = ref["sum"][rows]
        batch["ref_count"] = ref["count"][rows]
    return batch


def pad_rows(table: SequenceTable, rows: list[int], pad_id: int, multiple: int = 1) -> dict:
    """Rows of ``table``, right-padded to the longest, rounded up to a multiple of ``multiple``:
    batches of a few widths rather than a new one each time, whose kernels and memory blocks
    are reused (``train.pad_to_multiple_of``)."""
    seqs = [table.sequences[r] for r in rows]
    width = round_up(max(len(s.input_ids) for s in seqs), multiple)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        loss_mask[i, s.n_prompt : n] = True
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "rows": torch.tensor(rows)}


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (>= 1)."""
    return -(-n // multiple) * multiple


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
