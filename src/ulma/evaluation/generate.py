"""Batched generation with the chat template, resumable.

``generations.jsonl`` appears only when every row is done (written to a temporary file,
then renamed).  While a run goes on, finished batches are appended to
``generations.jsonl.partial``; a rerun with the same data and settings keeps those rows
and generates only the rest.  ``generations.meta.json`` records the model, the settings
and the run's method / data set / seed, so a resumed run cannot mix settings.

Row: {id, index, prompt (chat turns), response, reference, origin, finish, new_tokens};
``id`` is a hash of (prompt, reference), so a resumed run matches rows by content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ulma.atomic import atomic_write_json, atomic_write_jsonl
from ulma.data.schema import DataError
from ulma.data.tokenize import Tokenizer, left_pad, stop_tokens
from ulma.evaluation.io import EvalError, append_jsonl, read_json, read_jsonl
from ulma.logprobs import autocast


@dataclass
class GenerateConfig:
    max_new_tokens: int = 128
    batch_size: int = 8
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int = 0  # sampling: batch b is seeded with seed + index of its first row
    max_prompt_length: int = 1024  # longer prompts are cut from the left (the latest turns are kept)


def row_id(prompt, reference: str) -> str:
    """A stable id of one (prompt, reference) item: 16 hex digits of its SHA-256."""
    text = json.dumps([[dict(t) for t in prompt], reference], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stop_ids(model, tokenizer) -> set[int]:
    """Token ids that end a response: the end-of-turn token that training puts after each
    response (:func:`ulma.data.tokenize.response_suffix`: ``<|eot_id|>``, ``<end_of_turn>``,
    ...), the tokenizer's EOS and the model's own EOS ids."""
    ids = stop_tokens(tokenizer)
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids if i is not None}


def cut_at_stop(ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop token, and whether one was found."""
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k], True
    return ids, False


@torch.no_grad()
def generate_tokens(model, ids: torch.Tensor, mask: torch.Tensor, *, max_new_tokens: int, stops, pad_id: int,
                    sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    bf16: bool = False) -> torch.Tensor:
    """The one generation call (evaluation and PPO rollouts): left-padded prompts ``ids`` /
    ``mask`` [N, P] -> the new tokens [N, R] on the CPU (R <= max_new_tokens), ``pad_id``
    after a stop token.  Greedy, or sampled with ``sample`` (temperature, top-p, top-k)."""
    from transformers import GenerationConfig

    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if sample else {}
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=sorted(stops),
                           pad_token_id=pad_id, **sampling)
    dev = next(model.parameters()).device
    with autocast(dev, bf16):  # also: no cuDNN attention, each new token is a new shape
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gen)
    return out[:, ids.shape[1]:].cpu()


def generate_batch(model, tokenizer, prompt_ids: list[list[int]], cfg: GenerateConfig, seed: int | None = None):
    """Generate for a batch of prompt token ids; returns one dict per prompt:
    {text, finish, tokens}: the decoded response, "eos" (a stop token ended it) or
    "length" (max_new_tokens reached), and the response's token ids (without the stop token)."""
    stops = stop_ids(model, tokenizer)
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    if cfg.do_sample and seed is not None:
        torch.manual_seed(seed)
    out = generate_tokens(model, ids, mask, max_new_tokens=cfg.max_new_tokens, stops=stops,
                          pad_id=tokenizer.pad_token_id, sample=cfg.do_sample, temperature=cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k)
    results = []
    for row in out.tolist():
        kept, ended = cut_at_stop(row, stops)
        text = tokenizer.decode(kept, skip_special_tokens=True).strip()
        results.append({"text": text, "finish": "eos" if ended else "length", "tokens": kept})
    return results


def prompt_tokens(tokenizer, prompts, max_prompt_length: int) -> list[list[int]]:
    """Chat-template token ids of each prompt (the one tokenization of training), cut from the left."""
    tok = Tokenizer(tokenizer, max_length=max_prompt_length)
    return [tok.encode_prompt(p)[-max_prompt_length:] for p in prompts]


# ------------------------------------------------------------------ the resumable file


@dataclass
class GenerationFiles:
    final: Path  # generations.jsonl: complete or absent

    @property
    def partial(self) -> Path:
        return self.final.with_name(self.final.name + ".partial")

    @property
    def meta(self) -> Path:
        return self.final.with_name(self.final.name.split(".")[0] + ".meta.json")


def generate_file(model, tokenizer, items: list, path: Path, cfg: GenerateConfig, meta: dict, *,
                  overwrite: bool = False, progress: bool = True,
                  on_batch: Callable[[int], None] | None = None) -> dict:
    """Generate a response for each item (Demonstration: prompt + reference response) into
    ``path``, resuming from what an earlier run with the same settings left.

    Returns {rows, kept, generated, torn_lines_dropped, path}.  ``on_batch(rows_done)`` is
    called after each batch is on disk.
    """
    files = GenerationFiles(Path(path))
    files.final.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in (files.final, files.partial, files.meta):
            p.unlink(missing_ok=True)
    header = {"settings": dataclasses.asdict(cfg), **meta}
    _check_meta(files.meta, header)
    wanted = {row_id(d.prompt, d.response): i for i, d in enumerate(items)}
    done, torn = load_finished(files, wanted)
    todo = [i for i, d in enumerate(items) if row_id(d.prompt, d.response) not in done]
    if todo or not files.final.exists():
        atomic_write_json(files.meta, {**header, "complete": False, "rows": len(items)})
        atomic_write_jsonl(files.partial, list(done.values()))  # drops a torn last line for good
        _run_batches(model, tokenizer, items, todo, files.partial, cfg, done, progress, on_batch)
        rows = sorted(done.values(), key=lambda r: wanted[r["id"]])
        atomic_write_jsonl(files.final, [{**r, "index": wanted[r["id"]]} for r in rows])
        files.partial.unlink(missing_ok=True)
        atomic_write_json(files.meta, {**header, "complete": True, "rows": len(items)})
    return {"rows": len(items), "kept": len(items) - len(todo), "generated": len(todo),
            "torn_lines_dropped": torn, "path": str(files.final)}


def _run_batches(model, tokenizer, items, todo, partial, cfg, done, progress, on_batch) -> None:
    from tqdm.auto import tqdm

    batches = [todo[s:s + cfg.batch_size] for s in range(0, len(todo), cfg.batch_size)]
    for batch in tqdm(batches, desc="generate", disable=not progress, leave=False, dynamic_ncols=True):
        demos = [items[i] for i in batch]
        ids = prompt_tokens(tokenizer, [d.prompt for d in demos], cfg.max_prompt_length)
        outs = generate_batch(model, tokenizer, ids, cfg, seed=cfg.seed + batch[0])
        rows = [_row(i, d, o) for i, d, o in zip(batch, demos, outs)]
        append_jsonl(partial, rows)
        done.update((r["id"], r) for r in rows)
        if on_batch is not None:
            on_batch(len(done))


def _row(index: int, demo, out: dict) -> dict:
    return {"id": row_id(demo.prompt, demo.response), "index": index, "prompt": [dict(t) for t in demo.prompt],
            "response": out["text"], "reference": demo.response, "origin": demo.origin, "finish": out["finish"],
            "new_tokens": len(out["tokens"])}


def _check_meta(path: Path, header: dict) -> None:
    """A resumed run must use the model and decoding settings of the rows already written
    (the batch size may change: after running out of memory, say)."""
    if not path.exists():
        return
    old = read_json(path)
    for key, then, now in [("model", old.get("model"), header.get("model")),
                           *((f"settings.{k}", old.get("settings", {}).get(k), v)
                             for k, v in header["settings"].items() if k != "batch_size")]:
        if then != now:
            raise EvalError(
                f"{path}: the rows beside it were made with {key} = {then!r}, not {now!r}; rerun with "
                "the same settings to resume, or pass --overwrite (or another --out) to start over"
            )


def load_finished(files: GenerationFiles, wanted: dict) -> tuple[dict, int]:
    """Rows already generated ({id: row}) from the final file and the partial log, and how
    many torn last lines were dropped.  A row that is broken, or that belongs to another
    data selection, raises DataError naming the file, line and field."""
    done: dict = {}
    torn = 0
    for p in (files.final, files.partial):
        if not p.exists():
            continue
        rows, t = read_jsonl(p, allow_torn_tail=p == files.partial)
        torn += t
        for n, row in rows:
            for key in ("id", "response"):
                if not isinstance(row.get(key), str):
                    raise DataError(str(p), n, key, f"missing or not a string (got {row.get(key)!r})")
            if row["id"] not in wanted:
                raise DataError(str(p), n, "id", "this row's prompt is not in the current data selection "
                                "(another --data, --split or --limit?); use another --out or --overwrite")
            done[row["id"]] = row
    return done, torn


def read_generations(path: Path, on_error: str = "raise") -> tuple[list[dict], dict, list]:
    """Rows of a generations file for the judges, its meta (or {}) and the bad rows skipped.

    Each row needs ``prompt`` (a string or a list of chat turns), ``response`` and
    ``reference`` (strings); a broken one raises DataError (file, line, field) or, with
    ``on_error="skip"``, is skipped and returned in the third list.
    """
    from ulma.data.schema import make_prompt

    path = Path(path)
    files = GenerationFiles(path)
    meta = read_json(files.meta) if files.meta.exists() else {}
    if meta.get("complete") is False:
        raise EvalError(f"{path} is not finished ({files.partial} holds the rows so far); "
                        "rerun the same `ulma eval generate` command to finish it")
    rows, skipped = [], []
    for n, row in read_jsonl(path)[0]:
        try:
            rows.append(_generation_row(row, str(path), n, make_prompt))
        except DataError as e:
            if on_error == "raise":
                raise
            skipped.append(e)
    return rows, meta, skipped


def _generation_row(row: dict, file: str, n: int, make_prompt) -> dict:
    for key in ("response", "reference"):
        if not isinstance(row.get(key), str):
            raise DataError(file, n, key, f"missing or not a string (got {row.get(key)!r})")
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise DataError(file, n, "prompt", f"must be a string or a list of chat turns, got {prompt!r}")
    turns = make_prompt(prompt, file=file, row=n)
    return {"id": row.get("id") or row_id(turns, row["reference"]), "prompt": turns,
            "response": row["response"], "reference": row["reference"], "line": n}
