"""HTTP server for steadyclip: ``create_app(engine, settings=...)`` returns a FastAPI app.

Needs the ``server`` extra (``pip install 'steadyclip[server]'``). Run it with
``steadyclip serve``; it listens on 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

from steadyclip.server.app import create_app
from steadyclip.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
