"""``ulma reward eval FOLDER SOURCE``: a saved reward model's held-out numbers on any data.

Pair accuracy on pairs (and on same-prompt responses with different labels), Spearman
against continuous scores, calibration against binary labels -- the numbers ``method:
reward`` reports for its own held-out split, for another data set.
"""

from __future__ import annotations

import json


def register(sub) -> None:
    r = sub.add_parser("reward", help="use a reward model saved by method.name=reward")
    rsub = r.add_subparsers(dest="reward_command", required=True)
    e = rsub.add_parser("eval", help="pair accuracy, Spearman and calibration of a reward model on a data source")
    e.add_argument("model", help="folder saved by method.name=reward (AutoModelForSequenceClassification + tokenizer)")
    e.add_argument("source", help="a file (jsonl/json/csv/parquet, .gz ok) or a source name (pyrit, hh, ...)")
    e.add_argument("--format", help="source adapter to read it with (hh, golden_hh, qa_feedback, red_team, pyrit, ...)")
    e.add_argument("--option", action="append", default=[], help="adapter option key=value (YAML value), repeatable")
    e.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad rows: stop (default) or skip")
    e.add_argument("--limit", type=int, help="a seeded random subset of this many examples")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-length", type=int, default=512, help="prompt + response tokens; the prompt is cut from the left")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--calibration", action="store_true", help="report calibration of sigma(r) (a model trained with bce)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(handler=cmd_reward_eval)


def cmd_reward_eval(args) -> int:
    from ulma.config import parse_assignments
    from ulma.config import MethodConfig
    from ulma.data.prepare import build_eval, subsample
    from ulma.data.sources import load_source
    from ulma.data.tokenize import Tokenizer
    from ulma.inspect_data import guess_format
    from ulma.methods import Method
    from ulma.rlhf.reward import evaluate_scores, labelled_rows
    from ulma.scoring import RewardScorer, table_scores

    name, path = (args.format, args.source) if args.format else guess_format(args.source)
    loaded = load_source(name, None if args.source == args.format else path, on_error=args.on_error,
                         **dict(parse_assignments(args.option, "--option")))
    examples = subsample(loaded.examples, args.limit, args.seed)
    scorer = RewardScorer(args.model, max_length=args.max_length, batch_size=args.batch_size)
    ev = build_eval(examples, Method("reward", None, "pointwise", False), Tokenizer(scorer.tokenizer, args.max_length), None)
    labelled = labelled_rows(examples, scorer.tokenizer, args.max_length, ev.table)
    scores = table_scores(scorer.model, ev.table, scorer.model.config.pad_token_id, args.batch_size, False, True)
    loss = "bce" if args.calibration else "mse"  # which label-based metrics apply; the loss value itself is not reported
    report = evaluate_scores(scores, ev, labelled, loss, MethodConfig())
    report.pop("loss", None)
    report.update(model=str(args.model), source=name, path=path, examples=len(examples),
                  skipped_rows=len(loaded.skipped), prompts_truncated=ev.table.prompt_truncated)
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k:20s} {v:.4f}" if isinstance(v, float) else f"{k:20s} {v}")
    return 0
