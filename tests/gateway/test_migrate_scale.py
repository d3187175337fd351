"""`credgate secret migrate` at scale (issue 12, item 7, as the issue checks it): 1,000
secrets from `local` to a `vault` mount on a real OpenBao, the migrating process killed
(SIGKILL) halfway, then the same command again: every secret present once (one version
each, counted in OpenBao itself), verified, the source untouched. A file of its own so
that each file stays within about a minute; the gateway and helpers are test_migrate's.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.gateway.test_migrate import (  # noqa: F401 - gw, vault_prefix and openbao are fixtures
    ADMIN_TOKEN,
    CANARY,
    CREDGATE,
    ServedGateway,
    gw,
    listed,
    reveal,
    seed,
    vault_prefix,
    vault_versions,
    versions_by_path,
)
from tests.services.openbao import OpenBao, openbao  # noqa: F401 - the fixture
from tests.services.waiting import clean_env


def test_thousand_secrets_local_to_vault_killed_halfway_then_resumed_end_present_once_and_verified(
    gw: ServedGateway, openbao: OpenBao, vault_prefix: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    total = 1000
    seed(gw, "local", {f"k/s{i:04d}": {"user": f"u{i}", "password": f"{CANARY}{i}"} for i in range(total)})
    report = tmp_path / "report.json"
    env = clean_env(CREDGATE_ADDR=gw.addr, CREDGATE_TOKEN=ADMIN_TOKEN)
    proc = subprocess.Popen(
        [CREDGATE, "secret", "migrate", "--from", "local/k", "--to", "vlt/k", "--report", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:  # plain progress lines (stderr is not a terminal): "migrate: N/1000 done (...)"
        lines.append(line)
        m = re.match(r"migrate: (\d+)/1000 done", line)
        if m and int(m.group(1)) >= total // 2:
            proc.kill()  # SIGKILL: no chance to record anything more
            break
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, lines
    assert lines[0].startswith(f"1000 secret(s) under local/k/ -> vlt/k/; report: {report}")
    assert any(re.search(r"\d+/1000 done \(\d+ copied\), [0-9.]+/s, \d+ left", ln) for ln in lines)  # count, rate, left
    halfway = set(listed(gw, "vlt", "k/"))
    assert total // 2 <= len(halfway) < total
    partial = json.loads(report.read_text())  # as last written (every 2 s) before the kill
    assert partial["complete"] is False and partial["totals"]["secrets"] == total
    assert {s["destination"] for s in partial["secrets"] if s["status"] == "copied"} <= {f"vlt/{p}" for p in halfway}
    killed_at = time.monotonic()

    res = gw.cli("secret", "migrate", "--from", "local/k", "--to", "vlt/k", "--report", str(report))
    assert res.returncode == 0, (res.stdout, res.stderr)
    resumed_at = time.monotonic()
    out = json.loads(report.read_text())
    assert out["complete"] is True and out["totals"]["secrets"] == total and out["totals"]["verified"] == total
    statuses = {s["source"]: s["status"] for s in out["secrets"]}
    assert {statuses[f"local/{p}"] for p in halfway} == {"skipped"}  # nothing written twice
    # (writes in flight when the client died may have landed after the listing above: skipped too)
    assert out["totals"]["skipped"] >= len(halfway) and out["totals"]["copied"] == total - out["totals"]["skipped"]
    assert f"{total} verified" in res.stdout and CANARY not in res.stdout + res.stderr

    # Every secret present once: exactly one version each in OpenBao, equal to the source.
    assert vault_versions(openbao, vault_prefix, "k/") == {f"k/s{i:04d}": [1] for i in range(total)}
    for i in (0, 499, 500, 999):
        assert reveal(gw, f"vlt/k/s{i:04d}")["data"] == {"user": f"u{i}", "password": f"{CANARY}{i}"}
    # The source is untouched.
    assert versions_by_path(gw, "local", "k/") == {f"k/s{i:04d}": [1] for i in range(total)}
    sys.stderr.write(f"1,000 secrets local -> vault: {killed_at - started:.1f} s to the kill, "
                     f"{resumed_at - killed_at:.1f} s to resume\n")
