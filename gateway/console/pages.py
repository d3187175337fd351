"""Rendering: the Jinja2 environment (autoescaped: a value the API returns is text, never
markup), the page helper and the small formatting filters the templates use."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

import yaml
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.responses import HTMLResponse

ENV = Environment(
    loader=PackageLoader("gateway.console", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True, lstrip_blocks=True,
)


def when(value: Any) -> str:
    if not value:
        return ""
    try:
        at = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def query(base: dict[str, Any], **changes: Any) -> str:
    merged = {k: v for k, v in {**base, **changes}.items() if v not in (None, "")}
    return "?" + urlencode(merged) if merged else "?"


ENV.filters["when"] = when
ENV.globals["query"] = query

NAV = (  # key, label, URL, and the actions of which one shows the entry (none: always)
    ("overview", "Overview", "/console", ()),
    ("backends", "Backends", "/console/backends", ("backends:read",)),
    ("secrets", "Secrets", "/console/secrets", ("secrets:read",)),
    ("connectors", "Connectors", "/console/connectors", ("connectors:read",)),
    ("leases", "Credentials & leases", "/console/leases", ("leases:read",)),
    ("runs", "Runs", "/console/runs", ("leases:read", "runs:delegate")),
    ("policies", "Policies", "/console/policies", ("policies:read",)),
    ("identity", "Identity", "/console/identity", ("issuers:manage", "clients:manage", "admin_keys:manage")),
    ("audit", "Audit", "/console/audit", ("audit:read",)),
)


def render(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(ENV.get_template(template).render(nav=NAV, **context), status_code=status)


def continue_page(message: str) -> HTMLResponse:
    """After the identity provider's redirect: a same-site page that moves on to the console
    (a SameSite=Strict cookie is not sent on the cross-site redirect chain itself)."""
    return render("continue.html", message=message)


def yaml_lines(text: str, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each ``{field, message}`` of a validation error with the line of ``text`` it points at
    (``rules.0.actions.1`` -> that list item's line), for showing errors in place."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        root = None
    out = []
    for err in errors:
        node, line = root, None
        for part in str(err.get("field", "")).split("."):
            if node is None or not part:
                break
            line = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
                node = node.value[int(part)]
            else:
                node = None
        if node is not None:
            line = node.start_mark.line + 1
        out.append({"field": err.get("field", ""), "message": err.get("message", ""), "line": line})
    # A union's other branches (``literal['*']`` beside the action names) say nothing more.
    seen: set[tuple[str, int | None]] = set()
    kept = []
    for e in out:
        key = (re.sub(r"\.literal\[.*$", "", str(e["field"])), e["line"])
        if key not in seen:
            seen.add(key)
            kept.append(e)
    return kept


def yaml_problem(text: str) -> tuple[str, int | None] | None:
    """The YAML syntax error of ``text`` and its line, or None when it parses."""
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "not valid YAML"
        return str(problem), (mark.line + 1 if mark is not None else None)
    return None
