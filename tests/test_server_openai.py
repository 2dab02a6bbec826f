"""The real ``openai`` client against a live ``steadyclip serve``: bitwise the CLI's embeddings; /metrics."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from _server_fixtures import REPO, demo_images, serve_process, subprocess_env
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

MODEL = "steadyclip-demo"
TEXTS = ["a red circle", "a photo of a blue square.", "green triangle"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openai")


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[str]:
    with serve_process(workdir, MODEL) as url:
        yield url


@pytest.fixture(scope="module")
def images(workdir: Path) -> list[Path]:
    return demo_images(workdir / "images")[:3]


@pytest.fixture(scope="module")
def cli_doc(workdir: Path, images: list[Path]) -> dict[str, Any]:
    """``steadyclip embed --json`` in its own process, for the same images and texts."""
    cmd = [sys.executable, "-m", "steadyclip", "embed", *map(str, images),
           *[a for t in TEXTS for a in ("--text", t)], "--json"]
    out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(workdir), capture_output=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_text_embeddings_float_and_base64_equal_the_cli_bitwise(client: openai.OpenAI,
                                                                cli_doc: dict[str, Any]) -> None:
    expected = [t["embedding"] for t in cli_doc["texts"]]
    as_float = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    as_b64 = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64 and decodes it
    for resp in (as_float, as_b64):
        assert resp.model == MODEL and resp.object == "list"
        assert [d.index for d in resp.data] == [0, 1, 2]
        assert [d.embedding for d in resp.data] == expected  # float32 -> JSON -> float: equal values, equal bits
        assert resp.usage.prompt_tokens > len(TEXTS)
    single = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert single.data[0].embedding == expected[0]


def test_image_embeddings_equal_the_cli_bitwise(client: openai.OpenAI, images: list[Path],
                                                cli_doc: dict[str, Any]) -> None:
    resp = client.embeddings.create(model=MODEL, input=[_data_uri(p) for p in images], encoding_format="float",
                                    extra_body={"modality": "image"})
    assert [d.embedding for d in resp.data] == [i["embedding"] for i in cli_doc["images"]]
    extra = resp.model_extra or {}
    assert extra["provenance"]["weights_sha256"] == cli_doc["provenance"]["weights_sha256"]
    assert extra["warnings"] == []


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "steadyclip"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-4")


def test_errors_reach_the_client_as_its_usual_exceptions(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError, match="token arrays are not supported"):
        client.embeddings.create(model=MODEL, input=[[1, 2, 3]])
    with pytest.raises(openai.UnprocessableEntityError, match="never truncates"):
        client.embeddings.create(model=MODEL, input="x", dimensions=7)
    with pytest.raises(openai.NotFoundError, match="serves 'steadyclip-demo'"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.UnprocessableEntityError, match="fetches no URLs"):
        client.embeddings.create(model=MODEL, input="http://169.254.169.254/latest/meta-data",
                                 extra_body={"modality": "image"})
    err = httpx.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": []}, timeout=30).json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == "input"


def _samples(server: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _requests(samples: dict[Any, float], route: str, status: str) -> float:
    key = ("steadyclip_requests_total", (("method", "POST"), ("route", route), ("status", status)))
    return samples.get(key, 0.0)


def test_metrics_parse_and_move_with_traffic(client: openai.OpenAI, server: str, images: list[Path]) -> None:
    before = _samples(server)
    client.embeddings.create(model=MODEL, input=["one", "two"])
    client.embeddings.create(model=MODEL, input=[_data_uri(images[0])], extra_body={"modality": "image"})
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(model=MODEL, input=[[1]])
    after = _samples(server)
    assert _requests(after, "/v1/embeddings", "200") - _requests(before, "/v1/embeddings", "200") == 2
    assert _requests(after, "/v1/embeddings", "422") - _requests(before, "/v1/embeddings", "422") == 1
    rows = ("steadyclip_batch_rows_count", ())
    assert after[rows] > before.get(rows, 0.0)
    latency = ("steadyclip_request_duration_seconds_count", (("route", "/v1/embeddings"),))
    assert after[latency] - before.get(latency, 0.0) == 3
    replicas = httpx.get(f"{server}/v1/model", timeout=30).json()["execution"]["replicas"]
    assert after[("steadyclip_replicas", ())] == replicas >= 1 and after[("steadyclip_queue_depth", ())] >= 0
    assert after[("steadyclip_integrity_failures_total", ())] == 0
    httpx.get(f"{server}/readyz", timeout=30)
    assert _samples(server)[("steadyclip_ready", ())] == 1
