"""Schemathesis against a live server: schema-valid requests are accepted, nothing is a 5xx, answers match."""
from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from _server_fixtures import serve_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytestmark = pytest.mark.slow

# (path, method, examples); JSON and multipart bodies are both drawn. Bounded: well under a minute.
OPERATIONS = [
    ("/v1/embeddings", "POST", 50),
    ("/v1/embed", "POST", 35),
    ("/v1/classify", "POST", 35),
    ("/v1/models", "GET", 5),
    ("/v1/model", "GET", 3),
    ("/healthz", "GET", 3),
    ("/readyz", "GET", 3),
]


def _png(seed: int, w: int, h: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


_PNGS = st.builds(_png, st.integers(0, 2**16), st.integers(1, 48), st.integers(1, 48))
# The schema's image formats: the bytes must decode to an image, which no pattern can say.
schemathesis.openapi.format("image-base64", _PNGS.map(lambda b: base64.b64encode(b).decode()))
schemathesis.openapi.format("binary", _PNGS)  # multipart file parts: this suite sends only images there
schemathesis.openapi.format("image-data-uri", _PNGS.map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    with serve_process(workdir, "steadyclip-demo") as url:
        yield url


def _fuzz(server: str, where: str, strategy: st.SearchStrategy[schemathesis.Case[schemathesis.APIOperation[Any, Any, Any, Any]]], examples: int,
          statuses: Counter[int], rejected: list[str]) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: schemathesis.Case[schemathesis.APIOperation[Any, Any, Any, Any]]) -> None:
        response = case.call(base_url=server, timeout=60)
        statuses[response.status_code] += 1
        if response.status_code >= 300:
            rejected.append(f"{where} {case.body!r:.300} -> {response.status_code} {response.text[:300]}")
            return
        case.validate_response(response, checks=[schemathesis.checks.response_schema_conformance])

    run()


def test_schema_valid_requests_are_accepted_and_answers_match_the_schema(server: str) -> None:
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    statuses: Counter[int] = Counter()
    rejected: list[str] = []
    for path, method, examples in OPERATIONS:
        _fuzz(server, f"{method} {path}", schema[path][method].as_strategy(), examples, statuses, rejected)
    total = sum(statuses.values())
    print(f"fuzz: {total} requests, statuses {dict(statuses)}")
    assert total >= 80, statuses
    assert not [s for s in statuses if s >= 500], statuses
    assert not rejected, rejected[:5]
