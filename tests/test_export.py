"""`ulma merge` and `ulma push` / train.push_to_hub (ulma.export).

The hub is a local HTTP server on loopback speaking the endpoints huggingface_hub calls for
create_repo + upload_folder: repo creation, README metadata check, preupload (which answers
"lfs" for *.safetensors, as the hub's .gitattributes does, and "regular" for the rest), the
git-LFS batch API with its basic transfer (one PUT per file), and the commit (NDJSON: regular
files inline in base64, LFS files by sha256).  Xet, the hub's newer storage for LFS files, is
switched off (HF_HUB_DISABLE_XET): its chunked CAS protocol is not faked."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from ulma.config import ConfigError
from ulma.export import check_push, hub_base_model, merge, model_card, push
from ulma.trainer import train

from test_train import tiny_cfg

TOKEN = "hf_loopback_test_token"


class FakeHub(BaseHTTPRequestHandler):
    """The hub endpoints of create_repo and upload_folder; records what it received."""

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        data = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            data += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return data

    def do_PUT(self):  # the LFS basic transfer: the href the batch answer gave
        hub = self.server.hub
        hub["calls"].append(("PUT", self.path, None))
        hub["lfs"][self.path.rsplit("/", 1)[1]] = self._body()
        self._json(200, {})

    def do_POST(self):
        hub = self.server.hub
        body = self._body()
        hub["calls"].append(("POST", self.path, self.headers.get("Authorization")))
        path = self.path.split("?")[0]
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._json(401, {"error": "Invalid credentials"})
        if path == "/api/repos/create":
            payload = json.loads(body)
            hub["created"].append(payload)
            return self._json(200, {"url": f"{hub['url']}/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if path.endswith("/preupload/main"):
            files = json.loads(body)["files"]
            mode = {True: "lfs", False: "regular"}
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": mode[f["path"].endswith(".safetensors")],
                                               "shouldIgnore": False} for f in files]})
        if path.endswith(".git/info/lfs/objects/batch"):
            request = json.loads(body)
            assert request["operation"] == "upload" and "basic" in request["transfers"]
            return self._json(200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{hub['url']}/lfs/{o['oid']}"}}}
                for o in request["objects"]]})
        if path.endswith("/commit/main"):
            lines = [json.loads(line) for line in body.decode().splitlines() if line]
            repo = path[len("/api/models/"):-len("/commit/main")]
            hub["commits"].append({"repo": repo, "header": lines[0],
                                   "files": {e["value"]["path"]: base64.b64decode(e["value"]["content"])
                                             for e in lines[1:] if e["key"] == "file"},
                                   "lfs": {e["value"]["path"]: e["value"] for e in lines[1:] if e["key"] == "lfsFile"},
                                   "other": [e for e in lines[1:] if e["key"] not in ("file", "lfsFile")]})
            return self._json(200, {"commitUrl": f"{hub['url']}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40,
                                    "pullRequestUrl": None})
        return self._json(404, {"error": f"not faked: {path}"})

    def _json(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def received(hub: dict, commit: dict) -> dict:
    """{path: bytes} of one commit: its inline files, and its LFS files from their PUTs (each
    named in the commit by the sha256 of what was PUT)."""
    files = dict(commit["files"])
    for path, entry in commit["lfs"].items():
        data = hub["lfs"][entry["oid"]]
        assert entry == {"path": path, "algo": "sha256", "oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
        files[path] = data
    return files


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    server.hub = {"url": url, "calls": [], "created": [], "commits": [], "lfs": {}}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # for `ulma` in a process of its own
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # in this process: read from the environment at import
    yield server.hub
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A finished 2-step ULMA LoRA run on the tiny model (lora.dropout 0: merged = adapter exactly)."""
    from conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("export")
    rows = [{"prompt": f"Question {i}?", "completion": "A helpful answer." if i % 2 else "A rude answer.",
             "label": bool(i % 2)} for i in range(12)]
    data = write_jsonl(tmp / "feedback.jsonl", rows)
    out = tmp / "run"
    train(tiny_cfg(tiny_model_dir, data, out, "train.max_steps=2", "model.lora.target_modules=all-linear"))
    return out


def test_merged_model_gives_the_adapter_models_logits(run_dir, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = merge(str(run_dir), tmp_path / "merged")
    assert out == tmp_path / "merged"
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert (out / "tokenizer.json").exists() and (out / "README.md").exists()
    # the trained adapter moved the weights: B of LoRA starts at 0, so a changed B means a trained adapter
    adapter = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    ids = torch.tensor([[1, 50, 700, 3000, 20, 9, 411]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = base(ids).logits
    with_adapter = PeftModel.from_pretrained(base, run_dir / "final").eval()
    expected = with_adapter(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # a plain transformers model: no peft involved
    got = merged(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter changes the output


def test_merge_refuses_a_full_model_and_a_used_output_folder(run_dir, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"is a full model already \(no adapter_config.json\): nothing to merge"):
        merge(str(tiny_model_dir))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError, match=r"busy exists and is not empty; remove it or pass --out DIR"):
        merge(str(run_dir), tmp_path / "busy")


def test_model_card_names_base_method_data_and_metrics(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    card = model_card(run_dir, adapter=True, repo_id="me/tiny-ulma")
    header = card.split("---")[1]
    assert "library_name: peft" in header and "- ulma\n" in header and "- lora\n" in header
    assert "base_model" not in header  # a local folder is no hub id
    assert f"| base model | {results['config']['model']['name_or_path']} |" in card
    assert "| method | ulma (beta=0.1) |" in card
    assert f"| data | jsonl {results['config']['data']['train']['path']} |" in card
    assert "| weights | LoRA r=4, alpha=32, on all-linear |" in card
    assert "| steps | 2 |" in card
    loss = results["after"]["loss"]
    assert f"| loss | {results['before']['loss']:.4g} | {loss:.4g} |" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-ulma")' in card


def test_the_cards_base_model_is_a_hub_id_or_nothing(tmp_path):
    assert hub_base_model("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the offline alias
    assert hub_base_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub_base_model(str(tmp_path)) is None  # a local folder
    (tmp_path / "org").mkdir()
    assert hub_base_model(str(tmp_path / "org" / "x")) is None and hub_base_model("./org/x") is None
    assert hub_base_model("gpt2") == "gpt2" and hub_base_model(None) is None
    assert hub_base_model("not a/hub id") is None


def test_push_uploads_the_final_folder_and_card_over_http(run_dir, hub):
    url = push(run_dir, "me/tiny-ulma", private=True, endpoint=hub["url"])
    assert url == f"{hub['url']}/me/tiny-ulma/commit/{'1' * 40}"
    assert hub["created"] == [{"name": "tiny-ulma", "organization": "me", "visibility": "private"}]
    (commit,) = hub["commits"]
    assert commit["repo"] == "me/tiny-ulma" and commit["other"] == []
    oid = commit["lfs"]["adapter_model.safetensors"]["oid"]
    # each endpoint in this order (huggingface_hub 2.4 checks the README's metadata twice)
    assert list(dict.fromkeys((m, p) for m, p, _ in hub["calls"])) == [
        ("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"), ("POST", "/api/models/me/tiny-ulma/preupload/main"),
        ("POST", "/me/tiny-ulma.git/info/lfs/objects/batch"), ("PUT", f"/lfs/{oid}"),
        ("POST", "/api/models/me/tiny-ulma/commit/main")]
    final = run_dir / "final"
    on_disk = sorted(p.name for p in final.iterdir())
    assert "README.md" in on_disk and "adapter_model.safetensors" in on_disk
    assert sorted(commit["lfs"]) == ["adapter_model.safetensors"]  # the weights through LFS, the rest inline
    files = received(hub, commit)
    assert sorted(files) == on_disk
    for name in on_disk:  # byte for byte
        assert files[name] == (final / name).read_bytes(), name
    assert b'AutoPeftModelForCausalLM.from_pretrained("me/tiny-ulma")' in files["README.md"]


def test_push_without_a_token_or_with_a_bad_repo_id_fails_before_any_work(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no saved token either
    with pytest.raises(ConfigError, match=r"^train.push_to_hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN$"):
        check_push("me/model")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ConfigError, match=r"^train.push_to_hub: 'me/two words' is not a hub repo id \(like user/name\)"):
        check_push("me/two words")


def test_cli_merge_and_push(run_dir, hub, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_ENDPOINT": hub["url"]}
    merged = tmp_path / "m"
    done = subprocess.run([sys.executable, "-m", "ulma", "merge", str(run_dir), "--out", str(merged)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"wrote the merged model to {merged}"  # (deepspeed may log a line first)
    done = subprocess.run([sys.executable, "-m", "ulma", "push", str(merged), "me/merged"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"{hub['url']}/me/merged/commit/{'1' * 40}"
    (commit,) = hub["commits"]
    files = received(hub, commit)
    assert files["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    assert b"library_name: transformers" in files["README.md"]  # merge wrote the run's card
    # a hub that refuses: one line naming the repo and the retry
    env["HF_TOKEN"] = "wrong"
    done = subprocess.run([sys.executable, "-m", "ulma", "push", str(merged), "me/merged"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error == (f"ulma: error: push of {merged} to me/merged failed: Client error '401 Unauthorized' for url "
                     f"'{hub['url']}/api/repos/create'; retry with `ulma push {merged} me/merged`")


def test_train_push_to_hub_uploads_the_run_at_the_end(tiny_model_dir, hub, tmp_path):
    """`ulma train ... train.push_to_hub=me/run` in a process of its own, HF_ENDPOINT at the loopback hub."""
    from conftest import write_jsonl

    rows = [{"prompt": f"Question {i}?", "completion": "An answer.", "label": bool(i % 2)} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_ENDPOINT": hub["url"]}
    args = [f"model.name_or_path={tiny_model_dir}", "data.train.source=jsonl", f"data.train.path={data}",
            "data.eval_fraction=0.25", "data.max_length=64", "train.micro_batch_size=4", "train.grad_accum=1",
            "train.max_steps=1", "train.bf16=false", "train.progress=false", f"train.output_dir={out}",
            "model.lora.r=4", "train.push_to_hub=me/run", "train.hub_private=true"]
    done = subprocess.run([sys.executable, "-m", "ulma", "train", "configs/sft.yaml", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"pushed {out}/final to {hub['url']}/me/run/commit/{'1' * 40}" in done.stderr
    assert hub["created"] == [{"name": "run", "organization": "me", "visibility": "private"}]
    (commit,) = hub["commits"]
    files = received(hub, commit)
    final = out / "final"
    assert sorted(files) == sorted(p.name for p in final.iterdir())
    assert files["adapter_model.safetensors"] == (final / "adapter_model.safetensors").read_bytes()
    assert b"| method | sft (beta=0.1) |" in files["README.md"]


def test_train_push_to_hub_without_a_token_stops_before_training(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from ulma.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "run"
    args = [f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}", "train.push_to_hub=me/run"]
    assert main(["train", "configs/sft.yaml", *args]) == 2
    assert capsys.readouterr().err == ("ulma: error: train.push_to_hub: no Hugging Face token; run `hf auth login` "
                                       "or set HF_TOKEN\n")
    assert not out.exists()
