"""``steadyclip serve``: the HTTP server and web page (FastAPI + uvicorn)."""
from __future__ import annotations

import ipaddress
import logging
import os
from typing import TYPE_CHECKING

import click

from steadyclip.cli._common import (
    apply,
    build_engine,
    handle_errors,
    lock_option,
    model_argument,
    pretrained_option,
    settings_options,
)

if TYPE_CHECKING:
    from steadyclip.engine.settings import EngineSettings

_logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@model_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on. Anything but loopback exposes the model to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@apply(pretrained_option, lock_option, settings_options())
@click.option("--token", default=None, envvar="STEADYCLIP_TOKEN", show_envvar=True,
              help="Require 'Authorization: Bearer TOKEN' on /v1/*. Prefer the env var: a command line is "
                   "visible to other local users.")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long to wait for more images before running a partial micro-batch.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.001), default=30.0, show_default=True,
              help="Seconds before a request gets 504.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=16.0, show_default=True)
@click.option("--max-images", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-labels", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, help="Decoded pixels per image (default: library's).")
@click.option("--allow-url-host", "allow_url_hosts", multiple=True, metavar="HOST[:PORT]",
              help="Let /v1/embeddings fetch image URLs from this host (repeatable). Default: no URL is fetched.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level.")
@handle_errors
def serve(model: str, host: str, port: int, pretrained: str | None, lock_path: str | None, settings: EngineSettings,
          token: str | None, batch_wait_ms: float, timeout_s: float,
          max_body_mb: float, max_images: int, max_labels: int, max_pixels: int | None, allow_url_hosts: tuple[str, ...],
          log_level: str) -> None:
    """Serve MODEL (default: the bundled demo) over HTTP, with a web page at /.

    Results are bitwise those of `steadyclip classify --json` with the same model options.
    """
    try:
        import uvicorn

        from steadyclip.server import ServerSettings, create_app
    except ImportError as e:
        raise click.ClickException(f"the server needs its extra: pip install 'steadyclip[server]' ({e})") from e
    server = ServerSettings(
        token=token or None, max_body_bytes=int(max_body_mb * 1024 * 1024), max_images=max_images,
        max_labels=max_labels, max_pixels=max_pixels, request_timeout_s=timeout_s, batch_wait_ms=batch_wait_ms,
        allowed_url_hosts=tuple(allow_url_hosts),
    )
    if not _is_loopback(host):
        click.echo(f"warning: listening on {host}, reachable from the network"
                   + ("" if server.token else " WITHOUT a token (set --token or STEADYCLIP_TOKEN)"), err=True)
    engine = build_engine(model, pretrained, lock_path, settings)
    app = create_app(engine, settings=server)
    click.echo(f"steadyclip: serving {engine.loaded.info.model_id} on http://{host}:{port} "
               f"(pid {os.getpid()}, auth {'bearer' if server.token else 'none'})", err=True)
    # One process, one engine: workers>1 would load the model once per worker.
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1, access_log=log_level == "debug")


__all__ = ["serve"]
