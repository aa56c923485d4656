"""Judges behind one interface, ``judge(comparisons) -> judgments``, and judging files with
them: a model's generations against their references (:func:`judge_generations`), the
judge against human labels (:func:`judge_agreement`).

A :class:`Comparison` holds a prompt, the model's answer and the reference answer; a
:class:`Judgment` gives, per criterion, the model's outcome against the reference:
'win', 'tie', 'lose', or None when the judge's answer could not be read.

- :class:`ApiJudge`: any OpenAI-compatible chat-completions endpoint (the ``openai``
  client, which retries connection errors, timeouts, 408/409/429 and 5xx with
  exponential backoff and honours Retry-After), with bounded concurrency.
- :class:`LocalJudge`: the same prompt and parsing with a local Hugging Face chat model.
- :class:`RewardModelJudge`: a scalar reward model; the higher reward wins.

The two prompt judges ask each comparison in both orders (model first, then reference
first) and count a disagreement as a tie (:func:`ulma.evaluation.judge_prompt.combine`), and
keep every answer in an on-disk SQLite cache keyed by (judge, prompt): a stopped run
resumes without asking (or paying) twice.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from ulma.atomic import atomic_write_json, atomic_write_jsonl
from ulma.evaluation.config import CRITERIA, JudgeConfig
from ulma.evaluation.io import EvalError
from ulma.evaluation.judge_prompt import combine, outcome, parse_verdicts, render_judge_prompt
from ulma.evaluation.winrates import rate_intervals, rates, summarize


@dataclass
class Comparison:
    prompt: tuple  # chat turns, ending with the user's question
    model: str  # the answer being judged ([Text 1] in the first order)
    reference: str  # what it is compared with (the data set's chosen answer)


@dataclass
class Judgment:
    verdicts: dict  # criterion -> 'win' | 'tie' | 'lose' | None (unparseable)
    answers: list = field(default_factory=list)  # the judge's raw answers (first order, second order)
    disagreement: dict = field(default_factory=dict)  # criterion -> the two orders gave different verdicts
    scores: list | None = None  # reward judge: [r(model), r(reference)]

    def to_json(self) -> dict:
        out = {"verdicts": self.verdicts, "answers": self.answers, "order_disagreement": self.disagreement}
        return out if self.scores is None else {**out, "scores": self.scores}


class VerdictCache:
    """Judge answers on disk: SQLite (atomic, safe across threads behind one lock)."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")
        self._lock = threading.Lock()

    @staticmethod
    def key(judge_id: str, prompt: str) -> str:
        return hashlib.sha256(f"{judge_id}\0{prompt}".encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, answer: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, answer))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class PromptJudge:
    """A judge that reads the Appendix B prompt; subclasses implement :meth:`ask`."""

    id = "prompt"

    def __init__(self, cache: VerdictCache | None, both_orders: bool = True):
        self.cache = cache
        self.both_orders = both_orders
        self.stats = {"requests": 0, "cache_hits": 0, "malformed_responses": 0}

    def ask(self, prompts: list[str], progress: bool = True) -> list[str | None]:
        raise NotImplementedError

    def judge(self, items: list[Comparison], progress: bool = True) -> list[Judgment]:
        """Verdicts for each comparison (both orders when ``both_orders``)."""
        orders = (True, False) if self.both_orders else (True,)
        prompts = [render_judge_prompt(c.prompt, *((c.model, c.reference) if first else (c.reference, c.model)))
                   for c in items for first in orders]
        answers = self.ask(prompts, progress)
        k = len(orders)
        return [self._judgment(answers[i * k:(i + 1) * k], orders) for i in range(len(items))]

    @staticmethod
    def _judgment(answers: list, orders: tuple) -> Judgment:
        parsed = [parse_verdicts(a) for a in answers]
        verdicts, disagree = {}, {}
        for crit in CRITERIA:
            outs = [outcome(p[crit], first) for p, first in zip(parsed, orders)]
            verdicts[crit] = combine(outs[0], outs[-1])
            disagree[crit] = None not in outs and len(set(outs)) > 1
        return Judgment(verdicts, list(answers), disagree)

    def _cached(self, prompts: list[str]) -> tuple[list, list[int]]:
        """(answers with cache hits filled in, indices still to ask)."""
        answers: list = [None] * len(prompts)
        todo = []
        for i, p in enumerate(prompts):
            hit = self.cache.get(self.cache.key(self.id, p)) if self.cache is not None else None
            if hit is None:
                todo.append(i)
            else:
                answers[i] = hit
        self.stats["cache_hits"] += len(prompts) - len(todo)
        return answers, todo

    def _store(self, prompt: str, answer: str) -> None:
        if self.cache is not None:
            self.cache.put(self.cache.key(self.id, prompt), answer)


class ApiJudge(PromptJudge):
    """An OpenAI-compatible chat-completions endpoint (``POST {base_url}/chat/completions``)."""

    def __init__(self, cfg, cache: VerdictCache | None, both_orders: bool = True):
        from openai import OpenAI

        super().__init__(cache, both_orders)
        key = cfg.api_key or os.environ.get(cfg.api_key_env)
        if not key:
            raise EvalError(f"the API judge needs a key: set ${cfg.api_key_env} (or judge.api.api_key)")
        self.model = cfg.model or os.environ.get("ULMA_JUDGE_MODEL")
        if not self.model:
            raise EvalError("the API judge needs a model: set judge.api.model or $ULMA_JUDGE_MODEL (e.g. gpt-4o)")
        self.cfg = cfg
        self.client = OpenAI(base_url=cfg.base_url, api_key=key, max_retries=cfg.max_retries, timeout=cfg.timeout)
        self.id = f"api:{self.model}:temperature={cfg.temperature}:max_tokens={cfg.max_tokens}"
        self._stats_lock = threading.Lock()

    def ask(self, prompts: list[str], progress: bool = True) -> list[str | None]:
        """Answers for ``prompts``, at most ``concurrency`` requests in flight; the first
        request that still fails after the client's retries stops the run (EvalError)."""
        from tqdm.auto import tqdm

        answers, todo = self._cached(prompts)
        bar = tqdm(total=len(todo), desc="judge", disable=not progress, leave=False, dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = {pool.submit(self._ask_one, prompts[i]): i for i in todo}
            try:
                for f in as_completed(futures):
                    answers[futures[f]] = f.result()
                    bar.update(1)
            except Exception as e:
                pool.shutdown(wait=True, cancel_futures=True)  # answers in flight still reach the cache
                raise self._fatal(e) from e
            finally:
                bar.close()
        return answers

    def _ask_one(self, prompt: str) -> str | None:
        from openai import APIResponseValidationError

        with self._stats_lock:
            self.stats["requests"] += 1
        try:
            resp = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}],
                temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens,
            )
            text = resp.choices[0].message.content
        except (APIResponseValidationError, ValueError, AttributeError, IndexError, TypeError):
            # a 200 answer that is not a chat completion (not JSON: ValueError; no choices: the
            # others): counted as malformed, not cached, read as no verdict
            with self._stats_lock:
                self.stats["malformed_responses"] += 1
            return None
        text = text or ""
        self._store(prompt, text)
        return text

    def _fatal(self, e: Exception) -> EvalError:
        import openai

        where = f"judge endpoint {self.client.base_url} (model {self.model!r})"
        cache = ""
        if self.cache is not None:
            cache = f"; the {len(self.cache)} answers so far are cached in {self.cache.path}, rerun to resume"
        if isinstance(e, openai.APIConnectionError):
            return EvalError(f"{where} unreachable after {self.cfg.max_retries} retries: {e}{cache}")
        if isinstance(e, openai.AuthenticationError):
            return EvalError(f"{where} refused the API key (401): {e.message}")
        if isinstance(e, openai.NotFoundError):
            return EvalError(f"{where}: not found (404; a wrong base_url or model?): {e.message}")
        if isinstance(e, openai.APIStatusError):
            return EvalError(f"{where} answered HTTP {e.status_code} after {self.cfg.max_retries} retries: "
                             f"{e.message}{cache}")
        return EvalError(f"{where}: {type(e).__name__}: {e}{cache}")


class LocalJudge(PromptJudge):
    """The Appendix B prompt answered by a local Hugging Face chat model (greedy)."""

    def __init__(self, cfg, cache: VerdictCache | None, both_orders: bool = True):
        from ulma.evaluation.loading import load_model, resolve_model

        super().__init__(cache, both_orders)
        self.cfg = cfg
        spec = resolve_model(cfg.model)
        self.model, self.tokenizer = load_model(spec, cfg.dtype)
        self.id = f"local:{spec.describe()}:max_new_tokens={cfg.max_new_tokens}:max_prompt={cfg.max_prompt_length}"

    def ask(self, prompts: list[str], progress: bool = True) -> list[str | None]:
        from tqdm.auto import tqdm

        from ulma.data.schema import user_prompt
        from ulma.evaluation.generate import GenerateConfig, generate_batch, prompt_tokens

        answers, todo = self._cached(prompts)
        gen = GenerateConfig(max_new_tokens=self.cfg.max_new_tokens, max_prompt_length=self.cfg.max_prompt_length)
        for s in tqdm(range(0, len(todo), self.cfg.batch_size), desc="judge", disable=not progress, leave=False):
            chunk = todo[s:s + self.cfg.batch_size]
            ids = prompt_tokens(self.tokenizer, [user_prompt(prompts[i]) for i in chunk], gen.max_prompt_length)
            for i, out in zip(chunk, generate_batch(self.model, self.tokenizer, ids, gen)):
                answers[i] = out["text"]
                self._store(prompts[i], out["text"])
            self.stats["requests"] += len(chunk)
        return answers


class RewardModelJudge:
    """A scalar reward model r(x, y) (a sequence-classification folder with one output, as
    ``method.name=reward`` saves it): the model's answer wins when r(model) - r(reference)
    > tie_margin, loses when it is < -tie_margin, ties otherwise.  It judges one criterion.

    Scoring is :class:`ulma.scoring.RewardScorer`'s: the reward model's own tokenizer
    and chat template, padded batches, the checkpoint's head at the last non-padding token.
    """

    def __init__(self, cfg):
        from ulma.scoring import RewardScorer

        self.cfg = cfg
        self.scorer = RewardScorer(cfg.model, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                   bf16=cfg.dtype == "bfloat16")
        self.id = f"reward:{cfg.model}"
        self.stats = {"requests": 0, "cache_hits": 0, "malformed_responses": 0}
        self._memo: dict = {}  # (prompt, response) -> reward: the references recur in every model's comparisons

    def judge(self, items: list[Comparison], progress: bool = True) -> list[Judgment]:
        n, m, crit = len(items), self.cfg.tie_margin, self.cfg.criterion
        r = self._rewards([(c.prompt, c.model) for c in items] + [(c.prompt, c.reference) for c in items])
        out = []
        for i in range(n):
            d = r[i] - r[n + i]
            verdict = "win" if d > m else "lose" if d < -m else "tie"
            out.append(Judgment({crit: verdict}, [], {crit: False}, [r[i], r[n + i]]))
        return out

    def _rewards(self, texts: list[tuple]) -> list[float]:
        """r(x, y) of each (prompt, response); a pair this judge has scored before is not scored again."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            scores = self.scorer.score([p for p, _ in todo], [y for _, y in todo])
            self._memo.update(zip(todo, (float(v) for v in scores)))
        self.stats["requests"] += len(todo)
        self.stats["cache_hits"] += len(texts) - len(todo)
        return [self._memo[t] for t in texts]


def build_judge(cfg: JudgeConfig, cache_path: Path | None):
    """The judge that ``cfg.kind`` names (API and local judges get the answer cache)."""
    if cfg.kind == "reward":
        return RewardModelJudge(cfg.reward)
    cache = VerdictCache(cache_path) if cache_path is not None else None
    if cfg.kind == "api":
        return ApiJudge(cfg.api, cache, cfg.both_orders)
    return LocalJudge(cfg.local, cache, cfg.both_orders)


# ------------------------------------------------------------------ judging files


def judge_generations(judge, generations: Path, out_dir: Path, stats, on_error: str = "raise",
                      progress: bool = True) -> dict:
    """Judge every row of a generations file; writes ``judgments.jsonl`` and
    ``judge_summary.json`` in ``out_dir`` and returns the summary."""
    from ulma.evaluation.generate import read_generations  # on use: API judges need no torch

    rows, meta, skipped = read_generations(generations, on_error)
    if not rows:
        raise ValueError(f"{generations}: no rows to judge")
    items = [Comparison(r["prompt"], r["response"], r["reference"]) for r in rows]
    judgments = judge.judge(items, progress)
    out_dir = Path(out_dir)
    atomic_write_jsonl(out_dir / "judgments.jsonl",
                       [{"id": r["id"], "line": r["line"], **j.to_json()} for r, j in zip(rows, judgments)])
    summary = {
        **{k: meta.get(k) for k in ("model", "run", "method", "dataset", "seed")},
        "generations": str(generations),
        "judge": {"id": judge.id, **judge.stats},
        "rows": len(rows),
        "rows_skipped": [str(e) for e in skipped],
        "confidence": stats.confidence,
        "criteria": summarize(judgments, stats.confidence, stats.bootstrap_samples, stats.seed),
    }
    atomic_write_json(out_dir / "judge_summary.json", summary)
    return summary


def judge_agreement(judge, pairs: list, criterion: str, out_dir: Path, stats, dataset: str,
                    progress: bool = True) -> dict:
    """How often the judge orders human-ordered pairs as the humans did.

    Each pair is judged as (better, worse): 'win' = the judge agrees, 'lose' = it
    disagrees, 'tie' = it calls them equal.  Writes ``agreement.jsonl`` and
    ``agreement.json`` in ``out_dir``.
    """
    if not pairs:
        raise ValueError(f"{dataset}: no human-ordered pairs (pairs, or responses of one prompt with different scores)")
    judgments = judge.judge([Comparison(p.prompt, p.chosen, p.rejected) for p in pairs], progress)
    outcomes = [j.verdicts.get(criterion) for j in judgments]
    r, ci = rates(outcomes), rate_intervals(outcomes, stats.confidence, stats.bootstrap_samples, stats.seed)
    decided = r["n"] * (r["win"] + r["lose"]) if r["n"] else 0
    summary = {
        "dataset": dataset, "criterion": criterion, "judge": {"id": judge.id, **judge.stats},
        "pairs": len(pairs), "judged": r["n"], "unparseable": r["unparseable"],
        "agree": r["win"], "tie": r["tie"], "disagree": r["lose"],
        "agree_when_decided": (r["n"] * r["win"] / decided) if decided else float("nan"),
        "confidence": stats.confidence, "ci": {"agree": ci["win"], "tie": ci["tie"], "disagree": ci["lose"]},
    }
    out_dir = Path(out_dir)
    rows = [{"origin": p.origin, "human": "first", "judge": o, **j.to_json()}
            for p, o, j in zip(pairs, outcomes, judgments)]
    atomic_write_jsonl(out_dir / "agreement.jsonl", rows)
    atomic_write_json(out_dir / "agreement.json", summary)
    return summary
