"""Memory of one `ulma train` run, traced by phase, in the run's own process.

    PYTHONPATH=src python benchmarks/trace_memory.py --out trace.json -- train CONFIG key=value ...

Runs the CLI's ``main`` with the given arguments and a thread that samples, every
``--every`` seconds, the resident set (``VmRSS``, its anonymous and file-backed parts, and
the high-water mark ``VmHWM``) and glibc's heap (``mallinfo2``: bytes in use, free bytes
kept in the arenas, and mmapped blocks).  The Trainer's phases are marked by wrapping its
methods: setup, the reference pass, each step, each evaluation, each checkpoint and the
final save.  Writes one summary row per phase (steps grouped in windows of ``--window``)
to ``--out`` and prints them as a table.  A measuring tool, not part of the library.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import sys
import threading
import time


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = MallInfo2
MB = 1 << 20


def sample() -> dict:
    """Resident memory (MB) from /proc/self/status and glibc's heap (MB) from mallinfo2."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                status[k] = int(v.split()[0]) / 1024
    m = _libc.mallinfo2()
    ru = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds and page faults: the cost of a setting
    return {"user_s": ru.ru_utime, "system_s": ru.ru_stime, "minflt": ru.ru_minflt,
            "rss": status["VmRSS"], "hwm": status["VmHWM"], "anon": status["RssAnon"], "file": status["RssFile"],
            "in_use": (m.uordblks + m.hblkhd) / MB, "free": m.fordblks / MB, "heap": (m.arena + m.hblkhd) / MB,
            "mmapped": m.hblkhd / MB}


class Tracer:
    """Samples in a thread; ``phase(name)`` starts a new phase (its maxima start afresh)."""

    def __init__(self, every: float, live: str | None = None):
        self.every, self.rows, self.current, self.lock = every, [], None, threading.Lock()
        self.live = open(live, "w") if live else None  # each finished phase, as it finishes
        self.stop = threading.Event()
        self.phase("start")
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def phase(self, name: str) -> None:
        s = sample()
        with self.lock:
            if self.current is not None:
                self.current["end"], self.current["t1"] = s, time.time()
                self.rows.append(self.current)
                if self.live:
                    self.live.write(json.dumps(self.current) + "\n")
                    self.live.flush()
            self.current = {"phase": name, "t0": time.time(), "first": s, "max": dict(s), "n": 1}

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            s = sample()
            with self.lock:
                c = self.current
                c["n"] += 1
                for k, v in s.items():
                    c["max"][k] = max(c["max"][k], v)

    def close(self) -> list[dict]:
        self.stop.set()
        self.thread.join()
        self.phase("end")
        return self.rows


def instrument(tracer: Tracer) -> None:
    """Wrap the Trainer's phases so that each call starts a phase named after it."""
    from ulma.trainer import Trainer

    def wrap(name, label):
        f = getattr(Trainer, name)

        def wrapped(self, *a, **k):
            what = label(self, a) if callable(label) else label
            tracer.phase(what)
            try:
                return f(self, *a, **k)
            finally:
                tracer.phase(f"after {what}")

        setattr(Trainer, name, wrapped)

    wrap("__init__", "setup")
    wrap("_reference_caches", "reference pass")
    wrap("train_step", lambda self, a: f"step {a[0] + 1}")
    wrap("_evaluate", lambda self, a: f"evaluate at {a[1]}")
    wrap("save", lambda self, a: f"checkpoint {a[0]}")
    wrap("finish", "final save")


def summarise(rows: list[dict], window: int) -> list[dict]:
    """Steps grouped ``window`` at a time; the gaps between phases ("after ...") folded
    into the phase before them."""
    out = []
    for r in rows:
        name = r["phase"]
        if name.startswith("after "):
            name = name[6:]
        if name.startswith("step "):
            k = int(name.split()[1])
            lo = (k - 1) // window * window + 1
            name = f"steps {lo}-{lo + window - 1}"
        if out and out[-1]["phase"] == name:
            o = out[-1]
            o["seconds"] += r["t1"] - r["t0"]
            for k, v in r["max"].items():
                o["max"][k] = max(o["max"][k], v)
            o["end"] = r["end"]
        else:
            out.append({"phase": name, "seconds": r["t1"] - r["t0"], "max": dict(r["max"]), "end": r["end"]})
    return out


def table(summary: list[dict]) -> str:
    lines = ["| phase | s | peak RSS MB | VmHWM MB | peak in use MB | peak heap MB | peak free in heap MB | "
             "RSS at end MB | in use at end MB | free at end MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        m, e = s["max"], s["end"]
        lines.append(f"| {s['phase']} | {s['seconds']:.0f} | {m['rss']:.0f} | {e['hwm']:.0f} | {m['in_use']:.0f} | {m['heap']:.0f} | "
                     f"{m['free']:.0f} | {e['rss']:.0f} | {e['in_use']:.0f} | {e['free']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the phases (raw and summarised); OUTl: "
                   "one line per phase as it ends")
    p.add_argument("--every", type=float, default=0.02, help="seconds between samples")
    p.add_argument("--window", type=int, default=25, help="steps per summary row")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the arguments of `ulma`")
    a = p.parse_args()
    argv = a.args[1:] if a.args[:1] == ["--"] else a.args
    tracer = Tracer(a.every, a.out + "l")
    instrument(tracer)
    from ulma.cli import main as ulma_main

    code = ulma_main(argv)
    rows = tracer.close()
    summary = summarise(rows, a.window)
    with open(a.out, "w") as f:
        json.dump({"argv": argv, "phases": rows, "summary": summary}, f)
    print(table(summary))
    sys.exit(code)


if __name__ == "__main__":
    main()
