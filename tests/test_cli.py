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


def test_configs_lists_and_copies_the_shipped_configs(tmp_path):
    out = ulma("configs")
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert {"demo", "dpo", "ulma", "ulma_hh", "reward", "rlhf"} <= set(names)
    out = ulma("configs", "dpo", cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "dpo.yaml").read_text().startswith("# Pair-wise DPO (Eq. 5)")
    out = ulma("configs", "dpo", cwd=tmp_path)  # never overwrites
    assert out.returncode == 2 and "dpo.yaml exists" in out.stderr


def _one_line_error(out, *fragments):
    """Exit 2, no traceback, and the error in one line that names the given fragments."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, out.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_bad_arguments_anywhere_give_one_line_and_no_traceback(tiny_model_dir, tmp_path):
    """A walk through the commands with the mistakes users make."""
    good = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a?", "completion": "yes", "label": 1}])
    model = f"model.name_or_path={tiny_model_dir}"
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cases = [
        (["train", "no-such.yaml"], ["config 'no-such.yaml': no such file"]),
        (["train", "ulma", "train.lr"], ["override 'train.lr' must look like section.key=value"]),
        (["train", "ulma", "train.lr=fast"], ["train.lr: expected float, got 'fast'"]),
        (["train", "ulma", "trian.lr=1"], ["unknown key 'trian'"]),
        (["train", "ulma", "data.train.path=[unclosed"], ["not valid YAML"]),
        (["train", "ulma", "model.name_or_path=no/such-model", "data.train.source=jsonl", f"data.train.path={good}"],
         ["model.name_or_path: could not load 'no/such-model'", "local folder"]),
        (["train", "dpo", model, "train.overwrite=true", f"train.output_dir={tmp_path / 'r'}"],
         ["could not load 'Anthropic/hh-rlhf' from the Hugging Face hub", "data.train.path=FILE"]),
        (["train", "ulma", model, "data.train.source=jsonl", f"data.train.path={tmp_path / 'missing.jsonl'}",
          f"train.output_dir={tmp_path / 'r2'}"], ["missing.jsonl"]),
        (["train", "ulma", model, "data.train.source=nope", f"train.output_dir={tmp_path / 'r3'}"],
         ["unknown source 'nope'"]),
        (["data", "inspect", str(good), "--no-tokens", "--option", "columns"], ["--option 'columns' must look like"]),
        (["data", "inspect", str(good), "--no-tokens", "--option", "colour=red"], ["unknown option(s) ['colour']"]),
        (["data", "inspect", str(tmp_path / "nothing.txt"), "--no-tokens"], ["cannot tell the format"]),
        (["configs", "no-such"], ["config 'no-such': no such file"]),
        (["eval", "perplexity", str(tmp_path / "no-run"), "--data", str(good)], ["no-run"]),
        (["reproduce", "table1", "--set", "policy.nope=1", "--dry-run"], ["nope"]),
        (["reward", "eval", str(tmp_path / "no-model"), str(good)], ["no-model"]),
    ]
    for args, fragments in cases:
        out = subprocess.run([sys.executable, "-m", "ulma", *args], capture_output=True, text=True, cwd=tmp_path,
                             timeout=300, env={**__import__("os").environ, **offline})
        _one_line_error(out, *fragments)
    out = ulma("methods", "extra")  # argparse's own usage error
    assert out.returncode == 2 and "unrecognized arguments: extra" in out.stderr and "Traceback" not in out.stderr
