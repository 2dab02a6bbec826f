"""A real ``steadyclip serve`` process over loopback: answers bitwise equal to the CLI's, under load."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from _server_fixtures import (
    LABELS,
    cli_classify,
    demo_images,
    import_loadtest,
    serve_process,
)

torch.set_num_threads(1)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("live")


# Both servers need the token (one server start fewer than a third, token-only server): every client sends it.
TOKEN = "live-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", params=["1", "3"], ids=["replicas1", "replicas3"])
def server(workdir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """One engine process, and three replicas behind the micro-batcher: the same answers from both."""
    with serve_process(workdir, "steadyclip-demo", "--batch-wait-ms", "10", "--replicas", request.param,
                       token=TOKEN) as url:
        doc = httpx.get(f"{url}/v1/model", timeout=30, headers=AUTH).json()
        assert doc["execution"]["replicas"] == int(request.param)
        assert (doc["batching"]["max_rows"], doc["batching"]["in_flight"]) == (8, int(request.param))
        yield url


@pytest.fixture(scope="module")
def images(workdir: Path) -> list[Path]:
    return demo_images(workdir / "images")


@pytest.fixture(scope="module")
def cli_doc(workdir: Path, images: list[Path]) -> dict[str, Any]:
    return cli_classify(workdir, images, LABELS)


def _post(client: httpx.Client, url: str, path: Path) -> httpx.Response:
    return client.post(f"{url}/v1/classify", files={"image": (path.name, path.read_bytes(), "image/png")},
                       data={"labels": LABELS})


def test_server_answers_bitwise_equal_to_cli(server: str, images: list[Path], cli_doc: dict[str, Any]) -> None:
    with httpx.Client(timeout=60, headers=AUTH) as client:
        for path, expected in zip(images, cli_doc["results"]):
            resp = _post(client, server, path)
            assert resp.status_code == 200, resp.text
            doc = resp.json()
            row = doc["results"][0]
            # JSON floats round-trip exactly: equal numbers here are equal bits in both processes.
            assert row["probs"] == expected["probs"], path.name
            assert row["top"] == expected["top"], path.name
            assert doc["provenance"] == cli_doc["provenance"]


def test_sixteen_concurrent_clients_all_get_the_same_answers(server: str, images: list[Path],
                                                            cli_doc: dict[str, Any]) -> None:
    expected = {p.name: (r["probs"], r["top"]) for p, r in zip(images, cli_doc["results"])}
    failures: list[str] = []
    counts = {"ok": 0}
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=120, headers=AUTH) as http:
            for j in range(6):
                path = images[(k + j) % len(images)]
                resp = _post(http, server, path)
                with lock:
                    if resp.status_code != 200:
                        failures.append(f"{path.name}: {resp.status_code} {resp.text[:200]}")
                        continue
                    row = resp.json()["results"][0]
                    if (row["probs"], row["top"]) != expected[path.name]:
                        failures.append(f"{path.name}: answer differs under concurrency")
                    counts["ok"] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures[:5]
    assert counts["ok"] == 16 * 6
    batching = httpx.get(f"{server}/v1/model", timeout=30, headers=AUTH).json()["batching"]
    assert batching["largest_batch"] > 1, batching  # concurrent requests were batched together
    assert httpx.get(f"{server}/readyz", timeout=30).status_code == 200  # golden still bitwise after the storm


def test_token_protects_a_live_server(server: str, images: list[Path]) -> None:
    with httpx.Client(timeout=60) as client:
        assert _post(client, server, images[0]).status_code == 401
        wrong = client.post(f"{server}/v1/classify", files={"image": ("a.png", images[0].read_bytes())},
                            data={"labels": LABELS}, headers={"Authorization": "Bearer not-the-secret"})
        assert wrong.status_code == 401
        ok = client.post(f"{server}/v1/classify", files={"image": ("a.png", images[0].read_bytes())},
                         data={"labels": LABELS}, headers=AUTH)
        assert ok.status_code == 200


def test_loadtest_script_reports_throughput_and_latency(server: str, images: list[Path]) -> None:
    run_loadtest = import_loadtest().run_loadtest

    report = run_loadtest(server, images[0].read_bytes(), LABELS, clients=4, requests=12, max_seconds=60,
                          token=TOKEN)
    assert report["ok"] == 12 and report["server_errors"] == 0 and report["distinct_answers"] == 1
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    with pytest.raises(ValueError, match="loopback"):
        run_loadtest("http://10.1.2.3:8000", b"", LABELS)


def _png(exif: bytes | None = None) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 200, 0)).save(buf, format="PNG", **({"exif": exif} if exif else {}))
    return buf.getvalue()


def test_bad_uploads_and_decoder_warnings_are_the_same_wherever_images_are_decoded(server: str) -> None:
    """With replicas the uploads are decoded in them: same error (naming the image), same warnings."""
    with httpx.Client(timeout=60, headers=AUTH) as client:
        bad = client.post(f"{server}/v1/embed", files=[("image", ("ok.png", _png(), "image/png")),
                                                       ("image", ("junk.png", b"not an image", "image/png"))])
        assert bad.status_code == 422, bad.text
        err = bad.json()["error"]
        assert err["type"] == "ImageDecodeError" and "image #1 (junk.png)" in err["message"], err
        noisy = client.post(f"{server}/v1/embed",
                            files={"image": ("exif.png", _png(b"II*\x00\x08\x00\x00\x00\xff\xff"), "image/png")})
        assert noisy.status_code == 200, noisy.text
        notes = noisy.json()["warnings"]
        assert [n["index"] for n in notes] == [0] and "Corrupt EXIF" in notes[0]["message"], notes
        clean = client.post(f"{server}/v1/embed", files={"image": ("ok.png", _png(), "image/png")}).json()
        assert clean["warnings"] == [] and len(clean["images"][0]["embedding"]) > 0
