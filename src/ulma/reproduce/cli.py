"""``ulma reproduce EXPERIMENT``: thin parsing that builds a plan and runs it.

Exit codes: 0 every job done, 1 some job failed (the others ran; the report marks what is
missing), 2 bad input (names the option, key or file), 130 interrupted (finished cells are
kept; the same command resumes).
"""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    from ulma.reproduce.experiments import EXPERIMENTS

    r = sub.add_parser("reproduce", help="reproduce the paper's Tables 1-3 and Figures 1-2 (cpu or paper scale)",
                       description="Train and evaluate every (method, data set, seed) cell of the paper's tables, "
                       "then write OUT/report.md: the tables with 95%% intervals, Figures 1-2, and a verdict on "
                       "each of the paper's claims. Finished cells are skipped on a re-run.")
    r.add_argument("experiment", choices=EXPERIMENTS, help="table1 (HH, Golden HH, red-team), table2 (QA-feedback), "
                   "table3 (ablation), or all")
    r.add_argument("--scale", choices=["cpu", "medium", "paper"], default="cpu",
                   help="cpu: the offline model and local data, shrunk for a 2-core CPU; medium: the same data, one "
                   "seed, 10x the training prompts (timings in docs/reproduce.md); paper: the paper's setup "
                   "(Vicuna-7B v1.5, hub data, accelerate)")
    r.add_argument("--seeds", type=_positive, help="training runs per cell (default 3, as the paper)")
    r.add_argument("--out", help="output folder (default runs/reproduce-SCALE)")
    r.add_argument("--model", help="the policy model (hub id, folder or smollm2-135m-instruct); also the judge's base")
    r.add_argument("--methods", type=_names, help="comma-separated sub-set of the table's methods")
    r.add_argument("--datasets", type=_names, help="comma-separated sub-set of the data sets (hh, golden_hh, "
                   "red_team or pyrit, qa_feedback)")
    r.add_argument("--data-path", action="append", default=[], metavar="DATASET=PATH",
                   help="read a data set from this file instead of its default (repeatable)")
    r.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="change a setting of the scale, e.g. policy.lr=1e-4 split.train_prompts=96 (repeatable)")
    r.add_argument("--judge", choices=["reward", "api", "local"], default="reward",
                   help="reward: a reward model trained on the judge split (default); api: an OpenAI-compatible "
                   "endpoint with the paper's prompt ($OPENAI_API_KEY, $ULMA_JUDGE_MODEL, $OPENAI_BASE_URL or "
                   "--judge-config); local: the same prompt with a local chat model")
    r.add_argument("--judge-config", help="judge YAML (see configs/eval/judge.yaml)")
    r.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override in the judge YAML, e.g. judge.api.model=gpt-4o (repeatable)")
    r.add_argument("--launcher", choices=["inprocess", "accelerate"], help="how policy cells train "
                   "(default: cpu in process, paper through accelerate launch)")
    r.add_argument("--num-processes", type=_positive, help="accelerate processes (default: the GPUs visible)")
    r.add_argument("--accelerate-config", help="accelerate config file, e.g. configs/accelerate/ddp.yaml")
    r.add_argument("--dry-run", action="store_true", help="print the jobs and their settings; run nothing")
    r.add_argument("--report-only", action="store_true", help="rebuild the report from the cells on disk; run nothing")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(handler=cmd_reproduce)


def _positive(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _paths(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--data-path {item!r} must look like DATASET=PATH")
        out[key] = value
    return out


def build(args):
    """(plan, context) from the command line; every name and setting checked."""
    from ulma.reproduce.experiments import data_sets, tables_of
    from ulma.reproduce.context import Context, JudgeChoice
    from ulma.reproduce.runner import build_plan
    from ulma.reproduce.scales import load_scale

    sets = [f"policy.model={args.model}"] if args.model else []
    sets += [f"{k}={v}" for k, v in (("launcher", args.launcher), ("num_processes", args.num_processes),
                                     ("accelerate_config", args.accelerate_config)) if v]
    scale = load_scale(args.scale, sets + args.overrides)
    out = Path(args.out or f"runs/reproduce-{scale.name}").resolve()
    ctx = Context(out, scale, data_sets(args.scale, _paths(args.data_path)),
                  JudgeChoice(args.judge, args.judge_config, args.judge_option), progress=not args.no_progress)
    tables = tables_of(args.experiment)
    return build_plan(ctx, tables, args.seeds or scale.seeds, args.methods, args.datasets)


def cmd_reproduce(args) -> int:
    from ulma.config import ConfigError
    from ulma.data.schema import DataError
    from ulma.evaluation.io import EvalError
    from ulma.reproduce import runner
    from ulma.reproduce.summary import write_report

    try:
        plan = build(args)
        runner.preflight(plan)
    except (ValueError, FileNotFoundError, EvalError) as e:  # ConfigError and DataError are ValueErrors
        print(f"ulma: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(runner.describe(plan))
        return 0
    status = {}
    try:
        if not args.report_only:
            print(runner.describe(plan).splitlines()[0], flush=True)
            status = runner.run(plan, lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("ulma: interrupted; finished cells are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except (ConfigError, DataError) as e:
        print(f"ulma: error: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.dry_run:
            _report(plan, write_report)
    failed = [k for k, v in status.items() if v in ("failed", "blocked")]
    if failed:
        print(f"ulma: {len(failed)} job(s) failed or were blocked: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _report(plan, write_report) -> None:
    path = write_report(plan.ctx, plan.tables, plan.seeds)
    print(f"wrote {path} (and the tables, figures and claims.json beside it)")
    text = path.read_text()
    start = text.find("## The paper's claims")
    if start >= 0:
        print(text[start:text.find("## Wall time")].rstrip())
