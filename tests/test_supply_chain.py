"""Supply chain: the CI lock file, pip-audit on it, and bandit on the code.

- ``requirements/test.lock`` pins, with hashes, every distribution that
  ``credgate[test]`` needs (transitively); CI installs from it (README, "Test it").
- pip-audit on the lock finds no known vulnerability, except those justified in
  SECURITY.md (each passed as ``--ignore-vuln`` in ``IGNORED_VULNS``).
- bandit finds nothing of high severity in gateway/, backends/, connectors/, kms/.

See SECURITY.md for how the lock is regenerated and what was accepted, and why.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
import warnings
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REQUIRE_SERVICES, service_missing

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "test.lock"
PACKAGES = ("gateway", "backends", "connectors", "kms")
PROJECT = "credgate"

# pip-audit findings accepted in SECURITY.md ("Accepted pip-audit findings"), one
# ID per entry there. Empty: none is accepted today.
IGNORED_VULNS: tuple[str, ...] = ()


# --- the lock ---------------------------------------------------------------------

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")


def locked() -> dict[str, Version]:
    """Canonical name -> pinned version; every pin must carry at least one sha256 hash."""
    pins: dict[str, Version] = {}
    unhashed = []
    current = None
    for line in LOCK.read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = canonicalize_name(m["name"])
            assert current not in pins, f"{current} is pinned twice in {LOCK.name}"
            pins[current] = Version(m["version"])
            unhashed.append(current)
        elif current and line.strip().startswith("--hash=sha256:"):
            if unhashed and unhashed[-1] == current:
                unhashed.pop()
    assert pins, f"no pin found in {LOCK}"
    assert not unhashed, f"pins without a --hash in {LOCK.name}: {unhashed}"
    return pins


def _applies(req: Requirement, extras: set[str]) -> bool:
    """Whether a Requires-Dist applies here when its distribution is installed with
    `extras` ("" standing for the distribution without extras)."""
    return req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in extras)


def test_lock_pins_every_requirement_of_the_test_extra_in_range():
    """Every requirement of credgate[test] in pyproject.toml, following credgate's
    own extras (credgate[all] -> postgres, mysql, ...), is pinned in the lock to a
    version inside pyproject's range."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras_of = project["optional-dependencies"]
    pins = locked()
    problems = []
    seen: set[str] = set()
    todo = [Requirement(r) for r in project["dependencies"]] + [Requirement(f"{PROJECT}[test]")]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name == PROJECT:
            for extra in sorted(req.extras - seen):
                seen.add(extra)
                todo.extend(Requirement(r) for r in extras_of[extra])
            continue
        if name not in pins:
            problems.append(f"{req} is not pinned")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} is pinned outside its range, at {pins[name]}")
    assert "test" in seen and "all" in seen
    assert not problems, f"{LOCK.name} is stale, regenerate it (SECURITY.md): {problems}"


def _needed() -> dict[str, str]:
    """Every distribution the installed credgate[test] needs, transitively, from the
    installed metadata (Requires-Dist, with markers and extras) -> who needs it."""
    needed: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo: list[tuple[str, set[str], str]] = [(PROJECT, {"test"}, "the test command")]
    while todo:
        name, extras, via = todo.pop()
        key = canonicalize_name(name)
        fresh = ({""} | extras) - {e for (n, e) in done if n == key}
        if not fresh:
            continue
        done.update((key, e) for e in fresh)
        needed.setdefault(key, via)
        for spec in metadata.distribution(name).requires or []:
            req = Requirement(spec)
            if _applies(req, fresh):
                todo.append((req.name, set(req.extras), key))
    needed.pop(PROJECT)
    return needed


def test_lock_covers_every_distribution_the_test_environment_needs():
    pins = locked()
    missing = {name: via for name, via in _needed().items() if name not in pins}
    assert not missing, (
        f"needed but not pinned in {LOCK.name} (name: needed by): {missing}; regenerate it (SECURITY.md)"
    )


def test_installed_test_environment_is_the_locked_one():
    """CI installs exactly the lock: every needed distribution at its pinned version.
    (A venv installed another way, e.g. `pip install -e '.[test]'`, skips this test,
    unless CREDGATE_REQUIRE_SERVICES=1 as in CI.)"""
    pins = locked()
    drift = {
        name: f"{metadata.version(name)} installed, {pins[name]} locked"
        for name in _needed()
        if name in pins and Version(metadata.version(name)) != pins[name]
    }
    if drift:
        msg = f"this environment was not installed from {LOCK.name}: {drift}"
        if REQUIRE_SERVICES:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


# --- bandit -----------------------------------------------------------------------


def _tool(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed: install {LOCK.relative_to(ROOT)} (README, \"Test it\")", pytrace=False)


def test_bandit_finds_no_high_severity_issue():
    _tool("bandit")
    proc = subprocess.run(
        [sys.executable, "-m", "bandit", "-r", *PACKAGES, "-f", "json", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    # bandit exits 1 whenever it reports anything, LOW included: read its report.
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"bandit gave no report (exit {proc.returncode}): {proc.stderr[-2000:]}")
    assert not report["errors"], f"bandit could not scan: {report['errors']}"
    scanned = report["metrics"]["_totals"]["loc"]
    assert scanned > 1000, f"bandit scanned only {scanned} lines"
    high = [
        f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}"
        for r in report["results"]
        if r["issue_severity"] == "HIGH"
    ]
    assert not high, "high-severity bandit findings:\n" + "\n".join(high)


# --- pip-audit --------------------------------------------------------------------

# pip-audit's PyPI service asks for the JSON of each pinned release. Where that
# per-release document is not served (this workplace's network answers it with a
# 404) pip-audit would report every pin as "not found", skip it and still exit 0,
# having audited nothing. The hook below keeps pip-audit's own query, parsing and
# verdict, and only on such a 404 asks for the project's JSON instead, which
# carries the vulnerabilities of the project's current release: it is used only
# when that release IS the pinned one, so the answer is the same document's data.
# A pin behind its project's current release stays skipped (see the test).
PIP_AUDIT = r"""
import re, sys
from packaging.version import Version
import pip_audit._service.pypi as pypi
from pip_audit._cli import audit

PER_RELEASE = re.compile(r"^(?P<project>.*/pypi/[^/]+)/(?P<version>[^/]+)/json$")
_caching_session = pypi.caching_session

def caching_session(*args, **kwargs):
    session = _caching_session(*args, **kwargs)

    def current_release(response, **kw):
        m = PER_RELEASE.match(response.url)
        if response.status_code != 404 or m is None:
            return None
        project = session.get(m["project"] + "/json", timeout=kw.get("timeout"))
        if project.status_code == 200:
            if Version(project.json()["info"]["version"]) == Version(m["version"]):
                return project
        return None

    session.hooks["response"].append(current_release)
    return session

pypi.caching_session = caching_session
sys.argv[0] = "pip-audit"
audit()
"""

NETWORK_TROUBLE = re.compile(
    r"ConnectionError|ConnectTimeout|ReadTimeout|ProxyError|SSLError|Max retries exceeded"
    r"|NameResolution|Temporary failure in name resolution|network may be blocking"
)


def test_pip_audit_finds_no_unjustified_vulnerability_in_the_lock(tmp_path):
    _tool("pip_audit")
    report_file = tmp_path / "audit.json"
    cmd = [
        sys.executable, "-c", PIP_AUDIT,
        "-r", str(LOCK), "--require-hashes", "--disable-pip",
        "--progress-spinner", "off", "--timeout", "20",
        "--cache-dir", str(tmp_path / "cache"),
        "-f", "json", "-o", str(report_file),
    ]
    for vuln in IGNORED_VULNS:  # each justified in SECURITY.md
        cmd += ["--ignore-vuln", vuln]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        service_missing("PyPI (pip-audit's advisory data)", "pip-audit timed out")
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    if proc.returncode != 0 and report is None and NETWORK_TROUBLE.search(proc.stderr):
        service_missing("PyPI (pip-audit's advisory data)", proc.stderr.strip().splitlines()[-1])
    vulnerable = [
        f"{d['name']} {d['version']}: " + ", ".join(sorted({v["id"] for v in d["vulns"]}))
        + " (aliases: " + ", ".join(sorted({a for v in d["vulns"] for a in v.get("aliases", [])})) + ")"
        for d in (report or {}).get("dependencies", [])
        if d.get("vulns")
    ]
    assert proc.returncode == 0, (
        f"pip-audit exit {proc.returncode}: {vulnerable or proc.stderr[-3000:]} - upgrade the pin "
        "(SECURITY.md), or justify the ID there and add it to IGNORED_VULNS"
    )
    assert not vulnerable, vulnerable

    deps = report["dependencies"] if report else []
    audited = [d["name"] for d in deps if "skip_reason" not in d]
    skipped = [d["name"] for d in deps if "skip_reason" in d]
    assert len(deps) == len(locked()), f"pip-audit read {len(deps)} pins of {len(locked())}"
    if not audited:
        service_missing("PyPI (pip-audit's advisory data)", f"no pin could be audited: {skipped}")
    if skipped:
        # Pins behind their project's current release, whose per-release data is not
        # served here (see PIP_AUDIT): not audited by this run. SECURITY.md says why
        # these are held back; refreshing the lock brings the rest up to date.
        warnings.warn(f"pip-audit could not audit {len(skipped)} pins here: {skipped}", stacklevel=1)
