"""ulma.memory: what the CLI sets in glibc's allocator, and when it leaves it alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ulma import memory


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_configure_sets_a_fixed_mmap_threshold_only_when_asked(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    for k in ("ULMA_MALLOC", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(k, raising=False)
    assert memory.configure() == {} and libc.calls == []  # glibc as it is by default
    monkeypatch.setenv("ULMA_MALLOC", "compact")
    assert memory.configure() == {"mmap_threshold": 1 << 20}
    assert libc.calls == [("mallopt", -3, 1 << 20)]  # M_MMAP_THRESHOLD, 1 MiB


def test_configure_leaves_the_users_settings(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    monkeypatch.setenv("ULMA_MALLOC", "compact")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=4194304")
    assert memory.configure() == {}
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.configure() == {}
    assert libc.calls == []


def test_off_glibc_nothing_is_done(monkeypatch):
    monkeypatch.setattr(memory, "_libc", lambda: None)
    monkeypatch.setenv("ULMA_MALLOC", "compact")
    assert memory.configure() == {}
    memory.release()


def test_release_trims_the_heap(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: libc)
    memory.release()
    assert libc.calls == [("malloc_trim", 0)]


def test_allocator_library_follows_ulma_malloc(monkeypatch, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("libtcmalloc_minimal.so.4", "libjemalloc.so.2"):
        (lib / name).write_bytes(b"")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))  # a conda environment's lib/ comes first
    assert memory.allocator_library({}) == str(lib / "libjemalloc.so.2")  # jemalloc before tcmalloc
    assert memory.allocator_library({"ULMA_MALLOC": "auto"}) == str(lib / "libjemalloc.so.2")
    (lib / "libjemalloc.so.2").unlink()
    assert memory.allocator_library({}) == str(lib / "libtcmalloc_minimal.so.4")
    assert memory.allocator_library({"ULMA_MALLOC": "glibc"}) is None
    assert memory.allocator_library({"ULMA_MALLOC": "compact"}) is None
    mine = tmp_path / "libmine.so"
    mine.write_bytes(b"")
    assert memory.allocator_library({"ULMA_MALLOC": str(mine)}) == str(mine)
    with pytest.raises(ValueError, match=r"ULMA_MALLOC=/no/such/lib\.so: no such library file"):
        memory.allocator_library({"ULMA_MALLOC": "/no/such/lib.so"})


def _allocator_of_a_run(model_dir, data_file, out, env: dict) -> str:
    """`ulma train` from the command line, as a user runs it: the allocator its results.json records."""
    env = {k: v for k, v in {**os.environ, **env}.items() if k not in ("LD_PRELOAD", memory.PRELOADED)}
    args = [f"model.name_or_path={model_dir}", "data.train.source=jsonl", f"data.train.path={data_file}",
            "data.max_length=64", "train.max_steps=1", "train.bf16=false", "train.progress=false",
            f"train.output_dir={out}", "model.lora.r=4"]
    proc = subprocess.run([sys.executable, "-m", "ulma", "train", "sft", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "results.json").read_text())["allocator"]


def test_ulma_train_runs_again_with_the_library_preloaded(tiny_model_dir, pointwise_file, tmp_path):
    # glibc's own libc: on every Linux and mapped in any case, but only the process that
    # ulma train started again (it carries ULMA_MALLOC_PRELOADED) reports it as preloaded.
    libc = next(p for p in (line.split()[-1] for line in open("/proc/self/maps")) if Path(p).name.startswith("libc.so"))
    assert _allocator_of_a_run(tiny_model_dir, pointwise_file, tmp_path / "a", {"ULMA_MALLOC": libc}) == \
        f"{libc} (preloaded)"
    assert _allocator_of_a_run(tiny_model_dir, pointwise_file, tmp_path / "b", {"ULMA_MALLOC": "glibc"}) == "glibc malloc"


@pytest.mark.skipif(memory.allocator_library({}) is None, reason="no jemalloc or tcmalloc installed")
def test_ulma_train_runs_under_jemalloc_or_tcmalloc_where_installed(tiny_model_dir, pointwise_file, tmp_path):
    found = Path(memory.allocator_library({})).name.split(".so")[0]
    used = _allocator_of_a_run(tiny_model_dir, pointwise_file, tmp_path, {"ULMA_MALLOC": "auto"})
    assert f"/{found}.so" in used and used.endswith("(preloaded)"), used


def test_a_failed_start_again_goes_on_under_glibc(monkeypatch, capsys, tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setenv("ULMA_MALLOC", str(lib))
    monkeypatch.delenv(memory.PRELOADED, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))  # exec fails: no such file
    assert memory.preload_allocator([str(tmp_path / "no-python"), "-m", "ulma", "train", "x.yaml"]) is None
    assert f"could not start again with {lib} preloaded" in capsys.readouterr().err
    assert "LD_PRELOAD" not in os.environ  # this process is unchanged
