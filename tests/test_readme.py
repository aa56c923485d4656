"""The README's own-data commands and Python example run as written, on the tiny model
(the hub model id is the one thing swapped: this machine has no network)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def the_block(lang: str, marker: str) -> str:
    found = [b for b in blocks(lang) if marker in b]
    assert len(found) == 1, f"one ```{lang} block with {marker!r} in README.md"
    return found[0]


def commands(block: str) -> list[str]:
    """Shell lines of a block, continuations joined and comments dropped."""
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def run(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_the_own_data_commands_and_the_python_example_run_as_written(tiny_model_dir, tmp_path):
    rows = the_block("json", '"label": 1}').strip().splitlines()
    (tmp_path / "feedback.jsonl").write_text("\n".join(rows) + "\n")
    assert len([json.loads(r) for r in rows]) == 3
    ulma = str(Path(sys.executable).with_name("ulma"))
    inspect, train = commands(the_block("bash", "ulma train ulma model.name_or_path="))
    out = run(inspect.replace("ulma ", f"{ulma} ", 1), tmp_path)
    assert out.returncode == 0, out.stderr
    assert "examples: 3  by kind: {'pointwise': 3}" in out.stdout, out.stdout
    out = run(train.replace("ulma ", f"{ulma} ", 1).replace(HUB_MODEL, str(tiny_model_dir)), tmp_path)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "runs" / "mine" / "results.json").read_text())
    assert results["data"]["train_examples"] == 2 and results["data"]["eval_examples"] == 1  # 3 prompts, 1 held out
    assert (tmp_path / "runs" / "mine" / "final" / "adapter_model.safetensors").exists()

    code = the_block("python", "import ulma").replace(HUB_MODEL, str(tiny_model_dir))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    before, after = (float(x) for x in out.stdout.strip().splitlines()[-1].split(" -> "))
    py_results = json.loads((tmp_path / "runs" / "mine-py" / "results.json").read_text())
    assert (before, after) == (py_results["before"]["loss"], py_results["after"]["loss"])
    assert (before, after) == (results["before"]["loss"], results["after"]["loss"])  # the same run
