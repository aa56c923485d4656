"""Host memory of a training process: glibc's allocator, set once by the CLI, and a
release of freed heap pages after the big phases of a run.

PyTorch allocates every CPU tensor with ``malloc``.  glibc serves a block above its mmap
threshold with a mapping of its own, returned to the system when freed, and a smaller one
from its heap, where freed blocks stay resident for reuse.  By default the threshold is
dynamic: it rises to the size of any mapped block that is freed, up to 32 MB, so after a
run's first steps every activation comes from the heap.  Blocks of ever new sizes then
leave holes that later blocks do not fit, and the heap only grows; ulma's batches come in a
few widths for that reason (``train.pad_to_multiple_of``).  ``benchmarks/README.md``
("Memory of long runs") has the traces of a long run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt parameters, from glibc's malloc.h
M_ARENA_MAX = -8

# Blocks of at least this many bytes get mappings of their own (returned when freed): small
# enough that activations leave the heap, at the price of fresh pages the kernel zeroes
# (the trade-off measured in benchmarks/README.md, "Memory of long runs").
MMAP_THRESHOLD = 1 << 20


def _libc():
    """glibc, or None elsewhere (musl, macOS): then nothing here does anything."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def configure() -> dict:
    """Set glibc's allocator for a training run (called by ``ulma train`` before any tensor
    exists) when ``ULMA_MALLOC=compact``: a fixed mmap threshold of ``MMAP_THRESHOLD`` (which
    also stops its dynamic rise): lower, steady step peaks for many more page faults.
    Off by default: a long run still grows, and the page faults cost step time
    (benchmarks/README.md).  A threshold the user set in ``GLIBC_TUNABLES`` or
    ``MALLOC_MMAP_THRESHOLD_`` is kept.  Returns what was set."""
    libc = _libc()
    if libc is None or os.environ.get("ULMA_MALLOC") != "compact":
        return {}
    user = os.environ.get("GLIBC_TUNABLES", "") + " ".join(k for k in os.environ if k.startswith("MALLOC_"))
    if "mmap_threshold" in user.lower():
        return {}
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return {"mmap_threshold": MMAP_THRESHOLD}


def release() -> None:
    """Return the heap's free pages to the system (``malloc_trim(0)``): after a phase that
    freed much (the reference pass, an evaluation, a checkpoint), so that its holes do not
    stay resident through the next.  A no-op off glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
