"""`credgate audit verify [--against FILE]` against a real `credgate serve`: exit 0 when the
store and the sink file agree, 1 when the store's tail was cut with its checkpoints, 2 on
bad usage."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
from pathlib import Path

import httpx

from tests.gateway.test_cli import CREDGATE, stopped_gracefully
from tests.services.waiting import clean_env, free_port, wait_until_serving


def serve(tmp_path: Path, *, with_sink: bool) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    cfg = tmp_path / ("with-sink.yaml" if with_sink else "no-sink.yaml")
    sinks = f"audit_sinks:\n  - type: file\n    path: {tmp_path / 'audit.jsonl'}\n" if with_sink else ""
    cfg.write_text(f"port: {port}\ndata_dir: {tmp_path / 'd'}\naudit_checkpoint_every: 3\n{sinks}")
    out = tmp_path / f"serve-{port}.out"
    proc = subprocess.Popen([CREDGATE, "serve", "--dev", "--config", str(cfg)], stdout=out.open("w"),
                            stderr=subprocess.STDOUT, env=clean_env())
    wait_until_serving(f"http://127.0.0.1:{port}/readyz", proc)
    return proc, f"http://127.0.0.1:{port}", out


def stop(proc: subprocess.Popen, out: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    assert stopped_gracefully(proc.returncode, out.read_text()), out.read_text()


def cli(addr: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CREDGATE, *args], capture_output=True, text=True, timeout=60,
                          env=clean_env(CREDGATE_ADDR=addr, CREDGATE_TOKEN=token))


def test_verify_against_the_sink_file_finds_a_tail_cut_with_its_checkpoints(tmp_path: Path) -> None:
    proc, addr, out = serve(tmp_path, with_sink=True)
    try:
        token = re.findall(r"^CREDGATE_TOKEN=(\S+)$", out.read_text(), re.M)[0]
        for i in range(8):
            r = httpx.put(f"{addr}/v1/secrets/local/t/{i}", json={"data": {"k": "v"}},
                          headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
        res = cli(addr, token, "audit", "verify", "--against", str(tmp_path / "audit.jsonl"))
        assert res.returncode == 0 and res.stdout.startswith("ok: "), (res.stdout, res.stderr)
    finally:
        stop(proc, out)

    db = sqlite3.connect(tmp_path / "d" / "credgate.db")
    with db:  # the tail goes, and the checkpoints that vouched for it
        cut = db.execute("SELECT min(seq) FROM audit_checkpoints").fetchone()[0]
        db.execute("DELETE FROM audit_events WHERE seq > ?", (cut,))
        db.execute("DELETE FROM audit_checkpoints WHERE seq > ?", (cut,))
    db.close()

    proc, addr, out = serve(tmp_path, with_sink=False)
    try:
        assert cli(addr, token, "audit", "verify").returncode == 0  # the store alone can't tell
        res = cli(addr, token, "audit", "verify", "--against", str(tmp_path / "audit.jsonl"))
        assert res.returncode == 1, (res.stdout, res.stderr)
        # (the verification just above wrote event cut+1 again: it differs from the file's)
        assert res.stdout.startswith(f"BROKEN: first bad event {cut + 1}: ")
        assert "audit.jsonl records events up to" in res.stdout and "(the tail was truncated)" in res.stdout

        missing = cli(addr, token, "audit", "verify", "--against", str(tmp_path / "nope.jsonl"))
        assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1 and "can't read" in missing.stderr
        (tmp_path / "empty.jsonl").write_text("not json\n")
        empty = cli(addr, token, "audit", "verify", "--against", str(tmp_path / "empty.jsonl"))
        assert empty.returncode == 2 and "holds no audit lines" in empty.stderr
    finally:
        stop(proc, out)
