"""Host memory of a training process: the allocator ``ulma train`` runs under, and a
release of freed heap pages after the big phases of a run.

PyTorch allocates every CPU tensor with ``malloc``.  glibc serves a block above its mmap
threshold with a mapping of its own, returned to the system when freed, and a smaller one
from its heap, where freed blocks stay resident for reuse.  By default the threshold is
dynamic: it rises to the size of any mapped block that is freed, up to 32 MB, so after a
run's first steps every activation comes from the heap.  Blocks of ever new sizes then
leave holes that later blocks do not fit, and the heap only grows; ulma's batches come in a
few widths for that reason (``train.pad_to_multiple_of``), yet one step's blocks still leave
such holes.  jemalloc and tcmalloc keep blocks of a size together and return unused pages
over time, so ``ulma train`` runs under one of them where it is installed
(:func:`preload_allocator`).  ``benchmarks/README.md`` ("Memory of
long runs") has the traces of a long run under each.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

M_MMAP_THRESHOLD = -3  # mallopt parameters, from glibc's malloc.h
M_ARENA_MAX = -8

# Blocks of at least this many bytes get mappings of their own (returned when freed): small
# enough that activations leave the heap, at the price of fresh pages the kernel zeroes
# (the trade-off measured in benchmarks/README.md, "Memory of long runs").
MMAP_THRESHOLD = 1 << 20

# Allocators ``ulma train`` preloads when found, in this order (their library names).
ALLOCATORS = ("jemalloc", "tcmalloc_minimal", "tcmalloc")
CHOICES = "auto (jemalloc or tcmalloc where installed, the default), glibc, compact, or a library's path"
PRELOADED = "ULMA_MALLOC_PRELOADED"  # set in the re-executed process: the library it preloaded


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


def allocator_library(env=None) -> str | None:
    """The allocator library ``ulma train`` runs under, from ``ULMA_MALLOC``: unset or ``auto``,
    the first of :data:`ALLOCATORS` in this Python's ``lib/`` (a conda environment), else in
    the system's library cache; a path, that library; ``glibc`` or ``compact``, None (glibc's
    malloc).  None off Linux and where none is found."""
    env = os.environ if env is None else env
    choice = env.get("ULMA_MALLOC", "auto") or "auto"
    if choice in ("glibc", "compact") or not sys.platform.startswith("linux"):
        return None
    if choice != "auto":
        if not Path(choice).is_file():
            raise ValueError(f"ULMA_MALLOC={choice}: no such library file; set it to {CHOICES}")
        return choice
    for name in ALLOCATORS:  # this environment's own first: installed there on purpose
        for found in sorted(Path(sys.prefix, "lib").glob(f"lib{name}.so*")):
            return str(found)
    return next(filter(None, map(ctypes.util.find_library, ALLOCATORS)), None)


def preload_allocator(argv: list[str]) -> None:
    """Run this command again, in this process (``exec``), with :func:`allocator_library`
    preloaded (``LD_PRELOAD``): malloc is chosen when a process starts, so it cannot be
    swapped later.  Nothing when there is none, when it is already preloaded, or in the
    process this started (which carries ``ULMA_MALLOC_PRELOADED``).  ``argv``: the command
    line as the interpreter got it (``sys.orig_argv``)."""
    lib = allocator_library()
    if lib is None or os.environ.get(PRELOADED) or lib in os.environ.get("LD_PRELOAD", "") or not sys.executable:
        return
    env = preload_env(lib)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError as e:  # the run goes on under glibc's malloc rather than not at all
        print(f"ulma: could not start again with {lib} preloaded ({e}); glibc's malloc it is", file=sys.stderr)


def preload_env(lib: str) -> dict:
    """This process's environment with ``lib`` first in ``LD_PRELOAD``, marked as preloaded."""
    return {**os.environ, "LD_PRELOAD": f"{lib} {os.environ.get('LD_PRELOAD', '')}".strip(), PRELOADED: lib}


def allocator_in_use() -> str:
    """This process's allocator, for the run's log: the preloaded library where one is mapped
    into it (``/proc/self/maps``), else glibc's malloc."""
    try:
        maps = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()]
    except OSError:
        return "the system's malloc"
    wanted = [Path(os.environ.get(PRELOADED, "-")).name] + [f"lib{name}.so" for name in ALLOCATORS]
    for path in maps:
        if any(Path(path).name.startswith(w) for w in wanted):
            return f"{path} (preloaded)"
    return "glibc malloc" + (" (fixed mmap threshold)" if os.environ.get("ULMA_MALLOC") == "compact" else "")
