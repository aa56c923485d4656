"""ulma.memory: what the CLI sets in glibc's allocator, and when it leaves it alone."""

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
