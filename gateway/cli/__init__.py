"""The ``credgate`` command, one module per command group: ``secret``, ``backend``,
``connector``, ``cred`` (cred, unwrap, lease), ``policy``, ``identity`` (issuer, client,
admin-key, run), ``login`` (login, logout, whoami; the profile in ``profile``), ``audit``,
``keys``, ``server`` (serve, db). ``main`` is the root: the global options, the lazy
command table, and the one place errors are printed. ``common`` holds the global options
and input parsing, ``output`` the -o json|table|yaml printing and the one table renderer,
``crud`` the list/show/rm commands that groups share.

Light: importing :mod:`gateway.cli.main` loads typer and nothing of the client or the
server; a command group is imported when it runs, httpx when a request is made, and the
server (FastAPI, SQLAlchemy, uvicorn) only inside ``serve``, ``db`` and ``keys generate``.

May import: :mod:`gateway.client`, errors, paths; the web app, runtime, settings, store and
crypto inside the server-side commands.
"""
