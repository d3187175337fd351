"""CPU time and memory of a process tree, read from /proc (no psutil), and wrk's output parsed.

Pure functions over text plus thin readers, so that bench/run.py can charge each server
with the CPU of its whole tree: a process and its threads (``/proc/<pid>/stat`` of the
thread group leader already sums every thread), its live descendants (``credgate serve
--workers N`` is a parent with worker children; found by walking the ``ppid`` field of
every ``/proc/*/stat``), and the children it has reaped (``cutime``/``cstime``: e.g. a
PostgreSQL postmaster's finished backends).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class Stat:
    pid: int
    ppid: int
    ticks: int  # utime + stime + cutime + cstime
    rss_pages: int


def parse_stat(text: str) -> Stat:
    """One ``/proc/<pid>/stat`` line. The command name (field 2) is in parentheses and may
    itself hold spaces or parentheses: split after the LAST ')'."""
    head, _, rest = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    f = rest.split()
    # f[0] is field 3 (state): field n is f[n - 3]
    utime, stime, cutime, cstime = (int(f[i - 3]) for i in (14, 15, 16, 17))
    return Stat(pid=pid, ppid=int(f[4 - 3]), ticks=utime + stime + cutime + cstime, rss_pages=int(f[24 - 3]))


def _read_stat(pid: int, proc: Path) -> Stat | None:
    try:
        return parse_stat((proc / str(pid) / "stat").read_text())
    except (OSError, ValueError, IndexError):
        return None  # gone meanwhile


def descendants(root: int, parents: dict[int, int]) -> list[int]:
    """``root`` and every process below it, given ``pid -> ppid``."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree(root: int, proc: Path = Path("/proc")) -> list[Stat]:
    """The stats of ``root`` and its live descendants."""
    stats: dict[int, Stat] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            s = _read_stat(int(entry.name), proc)
            if s is not None:
                stats[s.pid] = s
    if root not in stats:
        return []
    return [stats[p] for p in descendants(root, {p: s.ppid for p, s in stats.items()}) if p in stats]


def tree_cpu_seconds(root: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds (user + system, with reaped children) of the tree under ``root``."""
    return sum(s.ticks for s in tree(root, proc)) / CLK_TCK


def tree_rss_mb(root: int, proc: Path = Path("/proc")) -> tuple[float, int, float]:
    """(total RSS of the tree in MB, number of processes, the largest process's RSS in MB)."""
    stats = tree(root, proc)
    sizes = [s.rss_pages * PAGE / 1e6 for s in stats]
    return (sum(sizes), len(sizes), max(sizes, default=0.0))


# --- wrk ------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class WrkOut:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: str  # "" when none


def parse_wrk(out: str) -> WrkOut:
    """The numbers of a ``wrk --latency`` run. Raises ValueError when they are not there."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    dist = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if not rps or not total or "50" not in dist or "99" not in dist:
        raise ValueError("not the output of wrk --latency")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)$", out, re.M)
    return WrkOut(float(rps.group(1)), wrk_ms(dist["50"]), wrk_ms(dist["99"]), int(total.group(1)),
                  int(non2xx.group(1)) if non2xx else 0, sock.group(1).strip() if sock else "")
