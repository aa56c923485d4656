"""The ``ulma`` command: thin parsing that builds a config and calls the library."""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ulma",
        description="Align language models with demonstrations and point-wise human feedback "
        "(ULMA, point-wise DPO, DPO, SFT, Unlearning, Unlikelihood).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train with a YAML config: ulma train CONFIG.yaml [section.key=value ...]")
    t.add_argument("config", help="a YAML file, or the name of a shipped config (`ulma configs` lists them)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4 method.beta=0.2")
    t.add_argument("--num-processes", type=int, default=1,
                   help="data-parallel processes on this machine (re-launches through torchrun; "
                   "for DeepSpeed/FSDP/multi-node use `accelerate launch --config_file configs/accelerate/... -m ulma train`)")

    d = sub.add_parser("data", help="look at data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    i = dsub.add_parser("inspect", help="counts, labels, token lengths and truncations of a data source")
    i.add_argument("source", help="a file (jsonl/json/csv/parquet, .gz ok) or a source name (pyrit, hh, ...)")
    i.add_argument("--format", help="source adapter to read it with (hh, golden_hh, qa_feedback, red_team, pyrit, ...)")
    i.add_argument("--option", action="append", default=[], help="adapter option key=value (YAML value), repeatable")
    i.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad rows: stop (default) or skip")
    i.add_argument("--model", default="smollm2-135m-instruct", help="tokenizer for token lengths")
    i.add_argument("--max-length", type=int, default=256)
    i.add_argument("--no-tokens", action="store_true", help="skip token statistics (no tokenizer needed)")
    i.add_argument("--json", action="store_true", help="print one JSON object")

    sub.add_parser("methods", help="list the training methods")
    c = sub.add_parser("configs", help="list the shipped example configs, or copy one out to edit: ulma configs NAME")
    c.add_argument("name", nargs="?", help="a shipped config (e.g. ulma_hh); without it: list them")
    c.add_argument("--out", help="where to write the copy (default: ./NAME.yaml)")
    for module in _plugin_modules():
        module.register(sub)
    return p


# Sub-commands that live beside their code: each module has register(subparsers), which
# adds its parsers with set_defaults(handler=fn); fn(args) -> exit code.
PLUGINS = ("ulma.evaluation.cli", "ulma.rlhf.cli", "ulma.reproduce.cli", "ulma.export")


def _plugin_modules():
    import importlib
    import importlib.util

    for name in PLUGINS:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) and importlib.util.find_spec(name):
            yield importlib.import_module(name)


def _options(pairs: list[str]) -> dict:
    from ulma.config import parse_assignments

    return dict(parse_assignments(pairs, "--option"))


def cmd_train(args) -> int:
    from ulma.memory import configure

    configure()  # glibc's allocator for a long run, before any tensor exists (ulma.memory)
    from ulma.config import load_config, validate
    from ulma.trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.num_processes > 1:
        validate(cfg)  # fail here, once, rather than in every process
        return _relaunch(args)
    results = train(cfg)
    print(json.dumps({k: results.get(k) for k in ("before", "after")}, indent=2))
    print(f"wrote {cfg.train.output_dir}/results.json and the model in {cfg.train.output_dir}/final")
    return 0


def _relaunch(args) -> int:
    """Run `ulma train` in N processes on this machine (gloo on CPU, NCCL on GPUs)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.num_processes}",
           "-m", "ulma", "train", args.config, *args.overrides]
    return subprocess.call(cmd)


def cmd_inspect(args) -> int:
    from ulma.inspect_data import format_report, inspect_source

    tokenizer = None
    if not args.no_tokens:
        from ulma.models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    report = inspect_source(args.source, args.format, _options(args.option), args.on_error, tokenizer, args.max_length)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def cmd_methods(args) -> int:
    from ulma.methods import METHODS

    for m in METHODS.values():
        print(f"{m.name:20s} data: {m.kind:13s} reference: {'yes' if m.needs_reference else 'no ':3s}  {m.help}")
    return 0


def cmd_configs(args) -> int:
    import shutil
    from pathlib import Path

    from ulma.config import CONFIGS, packaged_configs, resolve_config_path

    if not args.name:
        for name in packaged_configs():
            first = (CONFIGS / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
            print(f"{name:20s} {first}")
        return 0
    source = resolve_config_path(Path(args.name).name)
    out = Path(args.out or source.name)
    if out.exists():
        raise FileExistsError(f"{out} exists; pass --out to write the copy elsewhere")
    shutil.copyfile(source, out)
    print(f"wrote {out}: edit it, then `ulma train {out}`")
    return 0


COMMANDS = {"train": cmd_train, "data": cmd_inspect, "methods": cmd_methods, "configs": cmd_configs}

# What a user can fix: one line on stderr, exit code 2.  ValueError covers ConfigError and
# DataError (they name the key, or the file, row and field); ULMA_DEBUG=1 shows the traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    import os

    from ulma.errors import UsageError
    from ulma.export import PushError

    args = _parser().parse_args(argv)
    handler = getattr(args, "handler", None) or COMMANDS[args.command]
    try:
        if argv is None and args.command == "train":  # the command line, not a call from Python
            from ulma.memory import preload_allocator

            preload_allocator(sys.orig_argv)  # jemalloc or tcmalloc where installed: runs again under it
        code = handler(args)
    except (*USER_ERRORS, UsageError, PushError) as e:
        if os.environ.get("ULMA_DEBUG"):
            raise
        print(f"ulma: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ulma: interrupted; checkpoints written so far are kept (train.resume=true continues)", file=sys.stderr)
        return 130
    close_process_group()
    return code


def close_process_group() -> None:
    """Destroy the process group of a launched run (accelerate, torchrun) once it has ended well.

    Without this, gloo's worker threads outlive the interpreter's teardown, which can abort
    the process (SIGABRT, "terminate called without an active exception", pytorch#190489)
    after it has written all it had to.  Not after an error: destroying the group while peers are still inside a
    collective can hang them (torchtitan#1342).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
