"""A data set's train / test / judge split: disjoint by prompt, deterministic, made once.

``OUT/data/<name>/`` holds ``train.jsonl``, ``test.jsonl`` and ``judge.jsonl`` in TRL's
formats (``{prompt, chosen, rejected}`` for pairs, ``{prompt, completion, label}`` for
point-wise data; ``prompt`` is the list of chat turns), so every cell reads its data with
the ordinary ``jsonl`` source and its config can be rerun with ``ulma train`` alone.  For
point-wise data, ``train_pairs.jsonl`` and ``test_pairs.jsonl`` hold the pairs that DPO
trains and is evaluated on: two responses to one prompt with different labels
(:func:`ulma.data.schema.pointwise_to_pairs`).  ``manifest.json`` is written last: its
presence marks a complete split, and it records what the split was made from.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from ulma.atomic import atomic_write_json, atomic_write_jsonl
from ulma.config import ConfigError
from ulma.data.schema import as_kind, pointwise_to_pairs, positive_threshold
from ulma.data.sources import load_source, prompt_key, split_by_prompt
from ulma.evaluation.io import read_json

PARTS = ("train", "test", "judge")


def three_way_split(examples: list, test_fraction: float, judge_fraction: float, seed: int,
                    test_source: list | None = None) -> dict:
    """{train, test, judge} examples, no prompt in two parts.

    Without ``test_source``: ``judge_fraction`` of the prompts go to judge, ``test_fraction``
    to test, the rest to train.  With it (e.g. a hub "test" split): its prompts are divided
    between test and judge in the ratio test_fraction : judge_fraction, and train is
    ``examples`` less every prompt that test or judge holds.
    """
    if test_source is None:
        rest, judge = split_by_prompt(examples, judge_fraction, seed)
        train, test = split_by_prompt(rest, test_fraction / (1 - judge_fraction), seed + 1)
        return {"train": train, "test": test, "judge": judge}
    test, judge = split_by_prompt(test_source, judge_fraction / (test_fraction + judge_fraction), seed)
    held = {prompt_key(e.prompt) for e in test + judge}
    return {"train": [e for e in examples if prompt_key(e.prompt) not in held], "test": test, "judge": judge}


def cap_prompts(examples: list, limit: int | None, seed: int) -> list:
    """The examples of a seeded sample of ``limit`` distinct prompts, in their original order."""
    prompts = list(dict.fromkeys(prompt_key(e.prompt) for e in examples))
    if limit is None or limit >= len(prompts):
        return examples
    keep = set(random.Random(seed).sample(prompts, limit))
    return [e for e in examples if prompt_key(e.prompt) in keep]


def to_row(example) -> dict:
    """One example as a TRL-format JSON row (``origin``: where it came from, for people)."""
    prompt = [dict(t) for t in example.prompt]
    if example.kind == "pair":
        return {"prompt": prompt, "chosen": example.chosen, "rejected": example.rejected, "origin": example.origin}
    if example.kind == "pointwise":
        return {"prompt": prompt, "completion": example.response, "label": example.label, "origin": example.origin}
    raise ValueError(f"{example.origin}: a split holds pairs or point-wise examples, not {example.kind}")


def identity(ds, split_scale) -> dict:
    """What a split is made from: a split on disk made from anything else is not reused."""
    import dataclasses

    return {"source": ds.source, "path": ds.path, "options": ds.options, "test_options": ds.test_options,
            "kind": ds.kind, "split": dataclasses.asdict(split_scale)}


def prepare_split(ds, split_scale, folder: Path) -> dict:
    """Make (or find) the split of ``ds`` in ``folder``; returns its manifest."""
    folder = Path(folder)
    want = identity(ds, split_scale)
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        check_same(manifest["identity"], want, f"{folder} (the {ds.name} split)")
        return manifest
    examples, skipped = _load(ds, ds.options)
    test_source = _load(ds, ds.test_options)[0] if ds.test_options is not None else None
    s = split_scale
    parts = three_way_split(examples, s.test_fraction, s.judge_fraction, s.seed, test_source)
    caps = {"train": s.train_prompts, "test": s.test_prompts, "judge": s.judge_prompts}
    parts = {k: cap_prompts(v, caps[k], s.seed) for k, v in parts.items()}
    for part, rows in parts.items():
        if not rows:
            bad = f"; {len(skipped)} bad rows skipped, the first: {skipped[0]}" if skipped else ""
            raise ValueError(f"data set {ds.name}: the {part} split is empty ({len(examples)} examples loaded from "
                             f"{ds.path or ds.source}{bad}); check the data file and the split fractions")
    files = _write_parts(folder, parts, ds.kind)
    manifest = {"dataset": ds.name, "identity": want, "rows_skipped": len(skipped),
                "skipped_first": [str(e) for e in skipped[:5]], "files": files,
                "counts": {k: counts(v) for k, v in parts.items()}}
    atomic_write_json(manifest_path, manifest)
    return manifest


def _load(ds, options) -> tuple[list, list]:
    # on_error="skip": HH's test file has broken rows; they are counted in the manifest
    result = load_source(ds.source, ds.path, on_error="skip", **(options or {}))
    return result.examples, result.skipped


def _write_parts(folder: Path, parts: dict, kind: str) -> dict:
    """Write the part files (and the pairs of point-wise data); {file name: sha256}."""
    files = {f"{k}.jsonl": [to_row(e) for e in v] for k, v in parts.items()}
    if kind != "pair":
        for part in ("train", "test"):
            pairs = pointwise_to_pairs(as_kind(parts[part], "pointwise"))
            if pairs:
                files[f"{part}_pairs.jsonl"] = [to_row(p) for p in pairs]
    for name, rows in files.items():
        atomic_write_jsonl(folder / name, rows)
    return {name: _sha256(folder / name) for name in files}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def counts(examples: list) -> dict:
    """Examples, distinct prompts, positives, negatives and pairs of one part."""
    pw = as_kind(examples, "pointwise")
    threshold = positive_threshold(pw)  # 1 for binary labels, the best score present for scores
    positives = sum(e.label >= threshold for e in pw)
    pairs = sum(e.kind == "pair" for e in examples) or len(pointwise_to_pairs(pw))
    return {"examples": len(examples), "prompts": len({prompt_key(e.prompt) for e in examples}),
            "positives": positives, "negatives": len(pw) - positives, "pairs": pairs}


def read_part(folder: Path, part: str, kind: str) -> list:
    """The examples of one split file (``train``, ``test``, ``judge``, ``train_pairs``, ...)."""
    file_kind = "pair" if part.endswith("pairs") else kind
    return load_source("jsonl", str(Path(folder) / f"{part}.jsonl"), kind=file_kind).examples


def source_options(kind: str, part: str) -> dict:
    """The ``jsonl`` options that read a split file back as written."""
    return {"kind": "pair" if part.endswith("pairs") else kind}


def check_same(old: dict, new: dict, what: str) -> None:
    """Raise ConfigError naming the first setting where ``old`` (on disk) and ``new`` differ."""
    for key in sorted(set(_flat(old)) | set(_flat(new))):
        a, b = _flat(old).get(key, "(unset)"), _flat(new).get(key, "(unset)")
        if a != b:
            raise ConfigError(f"{what} was made with {key}={json.dumps(a)}, this run asks for {key}={json.dumps(b)}; "
                              "use another --out, or delete that folder to redo it")


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d} if prefix else {}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out
