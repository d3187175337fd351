"""The ``credgate`` command. Light: importing it loads the client, typer and httpx only;
the server (FastAPI, SQLAlchemy, uvicorn) is imported inside the server-side commands
(``serve``, ``db``, ``keys generate``) and only when they run.

May import: :mod:`gateway.client`, errors, paths; the web app and runtime inside ``serve``.
"""
