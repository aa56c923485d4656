"""The `ulma` command, run as users run it (a subprocess of the installed entry point)."""

import json
import subprocess
import sys

from conftest import SHARED, write_jsonl

import pytest


def ulma(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ulma", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_the_commands():
    out = ulma("--help")
    assert out.returncode == 0
    for cmd in ("train", "data", "methods"):
        assert cmd in out.stdout


def test_data_inspect_json_on_a_trl_file(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "a?", "completion": "yes", "label": True},
        {"prompt": "a?", "completion": "no", "label": False},
        {"prompt": "b?", "completion": "maybe", "label": False},
    ])
    out = ulma("data", "inspect", str(f), "--json", "--no-tokens")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert (r["examples"], r["positives"], r["negatives"], r["pairs"]) == (3, 1, 2, 0)
    assert r["label_histogram"] == {"0.0": 2, "1.0": 1}


@pytest.mark.skipif(not (SHARED / "data" / "hh-rlhf").exists(), reason="../shared/data is not here")
def test_data_inspect_hh_with_tokens_and_skips():
    path = SHARED / "data" / "hh-rlhf" / "harmless-base-test.part.jsonl.gz"
    out = ulma("data", "inspect", str(path), "--format", "hh", "--on-error", "skip", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert (r["examples"], r["pairs"], r["positives"], r["negatives"], r["skipped_rows"]) == (1794, 1794, 1794, 1794, 6)
    assert r["tokens"]["max_length"] == 256 and r["tokens"]["truncated_sequences"] > 0
    out = ulma("data", "inspect", str(path), "--format", "hh", "--no-tokens")
    assert out.returncode == 2 and "row 87, field 'chosen'" in out.stderr


def test_bad_row_and_bad_key_exit_2_naming_them(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "a", "completion": "b", "label": "yes"}\n')
    out = ulma("data", "inspect", str(f), "--no-tokens")
    assert out.returncode == 2 and f"{f}, row 2, field 'label'" in out.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {learning_rat: 0.1}\n")
    out = ulma("train", str(cfg))
    assert out.returncode == 2 and "unknown key train.'learning_rat'" in out.stderr


def test_a_launched_run_destroys_its_process_group_only_when_it_ends_well(tmp_path):
    """Gloo's threads must not outlive the interpreter (pytorch#190489: SIGABRT at exit),
    but a failed process must not destroy a group its peers may still be waiting in."""
    import torch.distributed as dist

    from ulma.cli import main

    def init(name):
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / name), 1), rank=0, world_size=1)

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {learning_rat: 0.1}\n")
    try:
        init("ok")
        assert main(["methods"]) == 0
        assert not dist.is_initialized()
        init("failed")
        assert main(["train", str(cfg)]) == 2
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
