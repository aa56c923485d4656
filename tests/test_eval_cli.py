"""`ulma eval generate | judge | agreement` as users run them (in process, through
ulma.cli.main), with the tiny model and a real OpenAI-compatible server on loopback."""

import json

import pytest

from conftest import write_jsonl
from test_eval_judges import Endpoint
from ulma.cli import main


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_is_interrupted_then_resumes(tiny_model_dir, pointwise_file, tmp_path, monkeypatch, capsys):
    import ulma.evaluation.generate as gen

    args = ["eval", "generate", str(tiny_model_dir), "--data", str(pointwise_file), "--out", str(tmp_path),
            "--batch-size", "2", "--max-new-tokens", "3", "--no-progress"]
    real, calls = gen.generate_batch, []

    def dies_on_the_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen, "generate_batch", dies_on_the_second_batch)
    assert main(args) == 130
    assert "interrupted; finished work is kept" in capsys.readouterr().err
    assert len(rows_of(tmp_path / "generations.jsonl.partial")) == 2
    monkeypatch.setattr(gen, "generate_batch", real)
    assert main(args) == 0  # 6 good answers (one per prompt with a positive) in pointwise_file
    assert "6 rows: 2 kept from an earlier run, 4 generated" in capsys.readouterr().out
    rows = rows_of(tmp_path / "generations.jsonl")
    assert [r["index"] for r in rows] == list(range(6))
    assert rows[0]["reference"] == "Mix flour, water and yeast, then bake."
    meta = json.loads((tmp_path / "generations.meta.json").read_text())
    assert (meta["method"], meta["dataset"], meta["complete"]) == ("base", "feedback", True)
    assert main(args) == 0 and "6 rows: 6 kept from an earlier run, 0 generated" in capsys.readouterr().out


def write_generations(folder, method, seed, responses):
    """A generations file + meta as `ulma eval generate` leaves them."""
    folder.mkdir(parents=True)
    rows = [{"id": f"r{i}", "prompt": [{"role": "user", "content": f"q{i}"}], "response": r,
             "reference": "useful"} for i, r in enumerate(responses)]
    write_jsonl(folder / "generations.jsonl", rows)
    (folder / "generations.meta.json").write_text(json.dumps(
        {"model": f"m-{method}", "method": method, "dataset": "hh", "seed": seed, "complete": True}))
    return folder / "generations.jsonl"


def test_judge_then_report(tmp_path, capsys):
    good = write_generations(tmp_path / "ulma", "ulma", 0, ["safe useful", "safe", "useful", "bad"])
    with Endpoint() as ep:
        judge = ["judge.api.base_url=" + ep.url, "judge.api.model=judge-1", "judge.api.api_key=sk-test"]
        assert main(["eval", "judge", str(good), *judge, "--no-progress"]) == 0
        assert ep.requests == 8
    out = capsys.readouterr().out
    # harmless vs "useful" (no "safe"): safe useful -> win, safe -> win, useful -> tie, bad -> tie
    assert "harmless: win 0.500 tie 0.500 lose 0.000 (win & tie 1.000) over 4 judged, 0 unparseable" in out
    # helpful ("useful" count vs 1): 1 -> tie, 0 -> lose, 1 -> tie, 0 -> lose
    assert "helpful: win 0.000 tie 0.500 lose 0.500 (win & tie 0.500)" in out
    summary = json.loads((tmp_path / "ulma" / "judge_summary.json").read_text())
    assert (summary["method"], summary["dataset"], summary["rows"]) == ("ulma", "hh", 4)
    judged = rows_of(tmp_path / "ulma" / "judgments.jsonl")
    assert judged[0]["verdicts"] == {"helpful": "tie", "harmless": "win"} and len(judged[0]["answers"]) == 2
    assert main(["report", str(tmp_path / "ulma"), "--out", str(tmp_path / "report")]) == 0
    assert "| ulma | – | 100.0 [100.0, 100.0] |" in (tmp_path / "report.md").read_text()


def test_judge_errors_name_what_to_fix(tmp_path, capsys):
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"prompt": "q", "response": "a", "reference": "b"}\n'
                   '{"prompt": "q", "response": 7, "reference": "b"}\n')
    assert main(["eval", "judge", str(bad), "judge.api.api_key=k", "judge.api.model=m"]) == 2
    assert f"{bad}, row 2, field 'response': missing or not a string (got 7)" in capsys.readouterr().err
    assert main(["eval", "judge", str(bad), "judge.kindd=api"]) == 2
    assert "unknown key judge.'kindd'" in capsys.readouterr().err
    assert main(["eval", "judge", str(bad), "judge.kind=reward"]) == 2
    assert "judge.reward.model: a reward judge needs" in capsys.readouterr().err
    down = ["judge.api.base_url=http://127.0.0.1:9/v1", "judge.api.model=m", "judge.api.api_key=k",
            "judge.api.max_retries=0", "--on-error", "skip", "--no-progress"]
    assert main(["eval", "judge", str(bad), *down]) == 3  # the skipped row is reported, the endpoint is down
    err = capsys.readouterr().err
    assert "judge endpoint http://127.0.0.1:9/v1/ (model 'm') unreachable after 0 retries" in err
    assert not (tmp_path / "judge_summary.json").exists()  # no half result


def test_agreement_with_human_pairs(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "a", "chosen": "safe", "rejected": "bad"},  # the judge agrees
        {"prompt": "b", "chosen": "safe reply", "rejected": "bad reply"},  # agrees
        {"prompt": "c", "chosen": "bad", "rejected": "safe"},  # disagrees
        {"prompt": "d", "chosen": "safe", "rejected": "safe too"},  # the judge calls it a tie
    ])
    with Endpoint() as ep:
        judge = ["judge.api.base_url=" + ep.url, "judge.api.model=j", "judge.api.api_key=k"]
        assert main(["eval", "agreement", "--data", str(pairs), "--out", str(tmp_path / "agr"), *judge,
                     "--no-progress"]) == 0
    assert "pairs (harmless): agree 0.500 tie 0.250 disagree 0.250 over 4 pairs judged" in capsys.readouterr().out
    s = json.loads((tmp_path / "agr" / "agreement.json").read_text())
    assert (s["agree_when_decided"], s["unparseable"], s["pairs"]) == (pytest.approx(2 / 3), 0, 4)
