"""bench/procstat.py: the /proc and wrk parsing the benchmark charges CPU and reads latencies with."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.procstat import CLK_TCK, descendants, parse_stat, parse_wrk, tree, tree_cpu_seconds


def stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0, rss: int = 10) -> str:
    # fields 3..: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    # priority nice num_threads itrealvalue starttime vsize rss ...
    rest = ["S", ppid, 1, 1, 0, -1, 0, 0, 0, 0, 0, utime, stime, cutime, cstime, 20, 0, 4, 0, 100, 1000, rss, 0]
    return f"{pid} ({comm}) " + " ".join(map(str, rest)) + "\n"


def test_parse_stat_splits_after_the_last_parenthesis_of_the_command_name():
    s = parse_stat(stat_line(42, "uvicorn (worker) x", 7, utime=100, stime=20, cutime=3, cstime=2, rss=55))
    assert (s.pid, s.ppid, s.ticks, s.rss_pages) == (42, 7, 125, 55)


def test_descendants_walks_the_whole_tree_and_nothing_else():
    parents = {10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 21: 20}
    assert sorted(descendants(10, parents)) == [10, 11, 12, 13]


def test_tree_cpu_sums_the_process_and_its_children(tmp_path: Path):
    for pid, ppid, ut in ((100, 1, 50), (101, 100, 30), (102, 101, 20), (200, 1, 999)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(stat_line(pid, "p", ppid, ut, 0))
    (tmp_path / "self").mkdir()  # not a pid: ignored
    assert sorted(s.pid for s in tree(100, tmp_path)) == [100, 101, 102]
    assert tree_cpu_seconds(100, tmp_path) == pytest.approx(100 / CLK_TCK)  # 50 + 30 + 20 ticks, not 999
    assert tree(999, tmp_path) == []


WRK = """Running 3s test @ http://127.0.0.1:8000
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.10ms    1.20ms  40.00ms   90.00%
  Latency Distribution
     50%    4.98ms
     75%    5.50ms
     90%    6.00ms
     99%    1.20s
  12345 requests in 3.00s, 1.50MB read
  Socket errors: connect 0, read 0, write 0, timeout 7
  Non-2xx or 3xx responses: 12
Requests/sec:   4115.00
Transfer/sec:    500.00KB
"""


def test_parse_wrk_reads_rate_percentiles_counts_and_errors():
    w = parse_wrk(WRK)
    assert (w.rps, w.p50_ms, w.p99_ms, w.requests, w.non2xx) == (4115.0, 4.98, 1200.0, 12345, 12)
    assert w.socket_errors == "connect 0, read 0, write 0, timeout 7"


def test_parse_wrk_refuses_output_without_the_latency_distribution():
    with pytest.raises(ValueError):
        parse_wrk("Running 3s test\nRequests/sec: 10\n")
