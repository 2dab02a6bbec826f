"""Image URLs on /v1/embeddings: fetched only from hosts the operator allowed, never followed elsewhere."""
from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from steadyclip.engine import Engine
from steadyclip.model.loading import load
from steadyclip.server import ServerSettings, create_app

PNG = Path("examples/red_circle.png").read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/red.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/moved.png":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load(), text_cache=None, replicas=1)


def _client(engine: Engine, hosts: tuple[str, ...]) -> TestClient:
    return TestClient(create_app(engine, settings=ServerSettings(allowed_url_hosts=hosts)))


def _embed(client: TestClient, item: str) -> object:
    return client.post("/v1/embeddings", json={"model": "steadyclip-demo", "modality": "image", "input": [item]})


def test_allowed_host_is_fetched_and_equals_the_data_uri(engine: Engine, image_host: str) -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    with _client(engine, (image_host,)) as client:
        fetched = _embed(client, f"http://{image_host}/red.png")
        inline = _embed(client, uri)
        assert fetched.status_code == 200, fetched.text  # type: ignore[attr-defined]
        assert fetched.json()["data"][0]["embedding"] == inline.json()["data"][0]["embedding"]  # type: ignore[attr-defined]
        schema = client.get("/openapi.json").text
        assert "^https?://" in schema, "the schema must say URLs are accepted when the operator allows them"


def test_urls_are_refused_by_default_and_off_the_allowlist(engine: Engine, image_host: str) -> None:
    with _client(engine, ()) as client:
        r = _embed(client, f"http://{image_host}/red.png")
        assert r.status_code == 422 and "--allow-url-host" in r.json()["error"]["message"]  # type: ignore[attr-defined]
    with _client(engine, ("images.example.com",)) as client:
        r = _embed(client, f"http://{image_host}/red.png")
        assert r.status_code == 422 and "images.example.com" in r.json()["error"]["message"]  # type: ignore[attr-defined]


def test_redirects_and_missing_files_are_not_followed(engine: Engine, image_host: str) -> None:
    with _client(engine, (image_host,)) as client:
        for path, status in (("/moved.png", "302"), ("/nothing.png", "404")):
            r = _embed(client, f"http://{image_host}{path}")
            assert r.status_code == 422 and status in r.json()["error"]["message"]  # type: ignore[attr-defined]
