"""Held-out splits that keep every prompt on one side (e.g. PyRIT by objective)."""

from __future__ import annotations

import random


def prompt_key(prompt) -> tuple:
    """A hashable key for a prompt (a tuple of {"role", "content"} dicts)."""
    return tuple((t["role"], t["content"]) for t in prompt)


def example_key(example) -> tuple:
    """The group an example is split with: its prompt; plain text (no prompt) is its own group."""
    return prompt_key(example.prompt) if example.prompt else (("text", example.response),)


def split_by_prompt(examples, test_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, test): a seeded shuffle of the distinct prompts puts ``round(test_fraction * n)``
    of them in test (at least one when ``0 < test_fraction`` and there are two or more
    prompts, and at least one left for train); every example follows its prompt, in the
    original order.  A plain-text example (empty prompt) counts as a prompt of its own.
    The same examples and seed always give the same split."""
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction!r}")
    examples = list(examples)
    prompts = list(dict.fromkeys(example_key(e) for e in examples))
    random.Random(seed).shuffle(prompts)
    n_test = round(test_fraction * len(prompts))
    if 0 < test_fraction < 1 and len(prompts) >= 2:
        n_test = min(max(n_test, 1), len(prompts) - 1)
    test_keys = set(prompts[:n_test])
    train = [e for e in examples if example_key(e) not in test_keys]
    test = [e for e in examples if example_key(e) in test_keys]
    return train, test
