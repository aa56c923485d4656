"""``ulma eval perplexity|preference|generate|judge|agreement`` and ``ulma report``: thin parsing
that calls :mod:`ulma.evaluation`.  Exit codes: 0 done, 2 bad input, 3 the evaluation
could not go on (e.g. the judge endpoint is down; finished work is kept), 130 interrupted."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path


MODEL_HELP = ("a run folder (uses its final/ model and, without --data, its held-out data), a checkpoint, "
              "a LoRA adapter folder, a full model folder, a hub id, or smollm2-135m-instruct")


def register(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model: perplexity, generation, judges, judge agreement")
    esub = e.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("perplexity", help="perplexity on the positive responses of a data split, "
                        "and per-example log-probs")
    _model_args(p)
    _data_args(p)
    p.add_argument("--max-length", type=_positive, default=1024,
                   help="prompt + response tokens (the prompt is cut from the left)")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="rows per forward pass (default: as train.forward_batch_size, 32 on CUDA, 8 elsewhere)")
    p.set_defaults(handler=_guard(cmd_perplexity))

    f = esub.add_parser("preference", help="preference accuracy on pairs humans ordered: how often the model's "
                        "log pi - log pi_ref is higher for the preferred answer (no judge needed)")
    _model_args(f)
    _data_args(f)
    f.add_argument("--reference", help="the reference model (default: an adapter's base, or the model a run "
                   "was trained from)")
    f.add_argument("--max-length", type=_positive, default=1024,
                   help="prompt + response tokens (the prompt is cut from the left)")
    f.add_argument("--batch-size", type=_positive, default=None,
                   help="rows per forward pass (default: as train.forward_batch_size, 32 on CUDA, 8 elsewhere)")
    f.set_defaults(handler=_guard(cmd_preference))

    g = esub.add_parser("generate", help="answer each prompt (one per prompt, with its reference answer); resumes")
    _model_args(g)
    _data_args(g)
    _generate_args(g)
    g.set_defaults(handler=_guard(cmd_generate))

    j = esub.add_parser("judge", help="judge generations against their references (API, local LLM or reward model)")
    j.add_argument("generations", help="a generations.jsonl of `ulma eval generate` "
                   "(or any JSONL of {prompt, response, reference})")
    _judge_args(j)
    j.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="broken rows: stop (default) or skip")
    j.set_defaults(handler=_guard(cmd_judge))

    a = esub.add_parser("agreement", help="how often the judge agrees with human labels (HH pairs, PyRIT scores)")
    _data_args(a)
    _judge_args(a)
    a.add_argument("--criterion", choices=["helpful", "harmless"], help="what the humans judged (default: by data set)")
    a.set_defaults(handler=_guard(cmd_agreement))

    r = sub.add_parser("report", help="Markdown table (paper layout) and PNG of win/tie/lose bars from eval folders")
    r.add_argument("folders", nargs="+", help="run folders (their eval/) or evaluation output folders")
    r.add_argument("--out", default="report", help="writes OUT.md and OUT.png (default: report)")
    r.add_argument("--criterion", action="append", default=[], metavar="DATASET=CRITERION",
                   help="the judge criterion reported for a data set (default: helpful for qa_feedback, "
                   "else harmless)")
    r.add_argument("--confidence", type=float, default=0.95)
    r.set_defaults(handler=_guard(cmd_report))


def _model_args(p) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--base", help="base model of an adapter (default: the one named in adapter_config.json)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", help="output folder (default: RUN/eval for a run folder)")
    p.add_argument("--no-progress", action="store_true")


def _data_args(p) -> None:
    p.add_argument("--data", help="a source name (pyrit, hh, ...) or a file; default: the run's held-out data")
    p.add_argument("--format", help="the adapter to read --data with (hh, golden_hh, qa_feedback, red_team, ...)")
    p.add_argument("--option", action="append", default=[], help="adapter option key=value (YAML value), repeatable")
    p.add_argument("--on-data-error", choices=["raise", "skip"], default="raise", help="bad data rows: stop or skip")
    p.add_argument("--split", choices=["all", "test", "train"], default="all",
                   help="test/train: split --data by prompt as training does (--test-fraction, --split-seed)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split and of --limit's subset")
    p.add_argument("--limit", type=_positive,
                   help="a seeded random subset of this many examples (prompts for generate)")
    p.add_argument("--name", help="the data set's name in reports (default: the source name)")


def _generate_args(g) -> None:
    g.add_argument("--batch-size", type=_positive, default=8)
    g.add_argument("--max-new-tokens", type=_positive, default=128)
    g.add_argument("--max-prompt-length", type=_positive, default=1024, help="longer prompts are cut from the left")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--overwrite", action="store_true", help="start over instead of resuming")


def _judge_args(p) -> None:
    p.add_argument("--config", help="judge YAML (see configs/eval/judge.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. judge.kind=local judge.api.model=gpt-4o")
    if not any(a.dest == "out" for a in p._actions):
        p.add_argument("--out", help="output folder (default: the generations file's folder)")
    p.add_argument("--no-progress", action="store_true")


def _positive(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _guard(fn):
    """Errors a user can act on become one line on stderr and an exit code."""

    @functools.wraps(fn)
    def run(args) -> int:
        from ulma.evaluation.io import EvalError

        try:
            return fn(args)
        except EvalError as e:
            print(f"ulma: error: {e}", file=sys.stderr)
            return 3
        except ValueError as e:  # DataError and ConfigError included: they name the file/row/field or key
            print(f"ulma: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("ulma: interrupted; finished work is kept; run the same command again to resume", file=sys.stderr)
            return 130

    return run


def _options(pairs: list[str]) -> dict:
    from ulma.config import parse_assignments

    return dict(parse_assignments(pairs, "--option"))


def _data_spec(args):
    from ulma.evaluation.examples import DataSpec

    return DataSpec(args.data, args.format, _options(args.option), args.on_data_error, args.split,
                    args.test_fraction, args.split_seed, args.limit, args.name)


def _out_dir(args, spec) -> Path:
    if args.out:
        return Path(args.out)
    if spec.run_dir is not None:
        return spec.run_dir / "eval"
    raise ValueError("pass --out FOLDER (the model is not a run folder, so there is no RUN/eval to write to)")


def _model_and_data(args):
    from ulma.evaluation.loading import resolve_model
    from ulma.evaluation.examples import load_eval_data

    spec = resolve_model(args.model, args.base)
    data = load_eval_data(_data_spec(args), spec.run_config)
    if data.skipped:
        print(f"skipped {len(data.skipped)} bad data rows (first: {data.skipped[0]})", file=sys.stderr)
    return spec, data, _out_dir(args, spec)


def cmd_perplexity(args) -> int:
    from ulma.config import TrainConfig
    from ulma.evaluation.loading import load_model, run_meta
    from ulma.evaluation.perplexity import write_perplexity
    from ulma.evaluation.examples import positives

    spec, data, out = _model_and_data(args)
    demos = positives(data, args.limit, args.split_seed)
    model, tokenizer = load_model(spec, args.dtype)
    rows = args.batch_size or TrainConfig().forward_rows(next(model.parameters()).device.type)
    summary = write_perplexity(model, tokenizer, demos, out, meta=run_meta(spec, data.name), about=data.about,
                               max_length=args.max_length, batch_size=rows, dtype=args.dtype,
                               rows_skipped=len(data.skipped), progress=not args.no_progress)
    lo, hi = summary["ci"]
    print(f"perplexity {summary['perplexity']:.4f} (95% bootstrap [{lo:.4f}, {hi:.4f}]) over {summary['tokens']} "
          f"tokens of {summary['examples']} responses in {summary['seconds']} s "
          f"-> {out}/perplexity.json, {out}/logps.jsonl")
    return 0


def cmd_preference(args) -> int:
    from ulma.config import TrainConfig
    from ulma.evaluation.examples import human_pairs
    from ulma.evaluation.loading import load_model, reference_model, resolve_model, run_meta
    from ulma.evaluation.preference import pair_logps, write_preference

    spec, data, out = _model_and_data(args)
    pairs = human_pairs(data, args.limit, args.split_seed)
    if not pairs:
        raise ValueError("no pairs that humans ordered in the data selection (pair rows, or point-wise rows "
                         "with two different labels for one prompt)")
    reference = args.reference or reference_model(spec)
    t0, logps, tokenizer = time.perf_counter(), {}, None
    for name, which in (("policy", spec), ("reference", resolve_model(reference))):
        model, tok = load_model(which, args.dtype)
        tokenizer = tokenizer or tok  # the policy's tokenizer for both: the same token ids
        rows = args.batch_size or TrainConfig().forward_rows(next(model.parameters()).device.type)
        logps[name] = pair_logps(model, tokenizer, pairs, max_length=args.max_length, batch_size=rows,
                                 progress=not args.no_progress)
        del model  # one model in memory at a time
    s = write_preference(logps["policy"], logps["reference"], out, meta={**run_meta(spec, data.name),
                         "reference": reference}, about=data.about, seconds=time.perf_counter() - t0)
    lo, hi = s["ci"]
    print(f"preference accuracy {s['accuracy']:.4f} (95% bootstrap [{lo:.4f}, {hi:.4f}], ties {s['ties']:.4f}) over "
          f"{s['pairs']} pairs against {reference} in {s['seconds']} s -> {out}/preference.json")
    return 0


def cmd_generate(args) -> int:
    from ulma.evaluation.generate import GenerateConfig, generate_file
    from ulma.evaluation.loading import load_model, run_meta
    from ulma.evaluation.examples import references

    spec, data, out = _model_and_data(args)
    items = references(data, args.limit, args.split_seed)
    if not items:
        raise ValueError("no prompt with a positive (reference) answer in the data selection")
    cfg = GenerateConfig(args.max_new_tokens, args.batch_size, args.sample, args.temperature, args.top_p, args.top_k,
                         args.seed, args.max_prompt_length)
    model, tokenizer = load_model(spec, args.dtype)
    meta = {**run_meta(spec, data.name), "data": data.about}
    t0 = time.perf_counter()
    res = generate_file(model, tokenizer, items, out / "generations.jsonl", cfg, meta, overwrite=args.overwrite,
                        progress=not args.no_progress)
    torn = f", {res['torn_lines_dropped']} torn line dropped" if res["torn_lines_dropped"] else ""
    print(f"{res['rows']} rows: {res['kept']} kept from an earlier run, {res['generated']} generated{torn} "
          f"in {time.perf_counter() - t0:.1f} s -> {res['path']}")
    return 0


def _judge(args, out: Path):
    from ulma.evaluation.config import load_eval_config
    from ulma.evaluation.judges import build_judge

    cfg = load_eval_config(args.config, args.overrides)
    cache = Path(cfg.judge.cache) if cfg.judge.cache else out / "judge_cache.sqlite"
    return build_judge(cfg.judge, cache), cfg


def cmd_judge(args) -> int:
    from ulma.evaluation.judges import judge_generations

    out = Path(args.out) if args.out else Path(args.generations).parent
    judge, cfg = _judge(args, out)
    summary = judge_generations(judge, Path(args.generations), out, cfg.stats, args.on_error, not args.no_progress)
    for crit, r in summary["criteria"].items():
        print(f"{crit}: win {r['win']:.3f} tie {r['tie']:.3f} lose {r['lose']:.3f} (win & tie {r['win_tie']:.3f}) "
              f"over {r['n']} judged, {r['unparseable']} unparseable, {r['order_disagreements']} order disagreements")
    print(f"judge: {json.dumps(summary['judge'])} -> {out}/judge_summary.json, {out}/judgments.jsonl")
    return 0


def cmd_agreement(args) -> int:
    from ulma.evaluation.judges import judge_agreement
    from ulma.evaluation.report import default_criterion
    from ulma.evaluation.examples import human_pairs, load_eval_data

    if not args.data or not args.out:
        raise ValueError("agreement needs --data (with human labels: pairs or scores) and --out FOLDER")
    data = load_eval_data(_data_spec(args))
    out = Path(args.out)
    judge, cfg = _judge(args, out)
    criterion = args.criterion or default_criterion(data.name)
    s = judge_agreement(judge, human_pairs(data, args.limit, args.split_seed), criterion, out, cfg.stats, data.name,
                        not args.no_progress)
    print(f"{s['dataset']} ({criterion}): agree {s['agree']:.3f} tie {s['tie']:.3f} disagree {s['disagree']:.3f} "
          f"over {s['judged']} pairs judged, {s['unparseable']} unparseable -> {out}/agreement.json")
    return 0


def cmd_report(args) -> int:
    from ulma.evaluation.io import EvalError
    from ulma.atomic import atomic_write_text
    from ulma.evaluation.report import load_result, markdown, plot_bars

    criteria = dict(_pair(c) for c in args.criterion)
    results = [load_result(f) for f in args.folders]
    text = markdown(results, criteria, args.confidence)
    md = Path(f"{args.out}.md")
    md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(md, text)
    print(text)
    try:
        print(f"wrote {md} and {plot_bars(results, f'{args.out}.png', criteria)}")
    except EvalError as e:  # perplexity only: a table, no bars
        print(f"wrote {md} (no PNG: {e})")
    return 0


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or value not in ("helpful", "harmless"):
        raise ValueError(f"--criterion {item!r} must look like DATASET=helpful or DATASET=harmless")
    return key, value
