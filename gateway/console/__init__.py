"""The security admin's web console, served by the gateway at ``/console``.

Server-rendered pages (Jinja2, autoescaped) with a little progressive enhancement
(``static/console.js``: confirmations, and the reveal, which needs it); every asset comes
from the gateway itself, under a strict Content-Security-Policy.

What it owns: the pages and actions (:mod:`.routes`), the session cookie, CSRF and security
headers (:mod:`.session`), the in-process API client (:mod:`.api`), schema-generated forms
(:mod:`.forms`) and rendering (:mod:`.pages`).

What it may import: the error tree, the policy vocabulary (``gateway.policy.rules``:
action names for the explain form), the web framework, Jinja2, httpx and PyYAML. Never the
runtime, the services or the store: the console is a client of the gateway's own REST API
(:mod:`.api`), so a page or a button obeys the same authentication, policy and audit as
the CLI (import-linter contract ``console-is-an-api-client``). The sign-in that turns an
admin key or an IdP sign-in into a console session is an API route
(gateway/web/routes/console.py).
"""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).parent / "static"
