"""The HTTP app in-process (TestClient): every endpoint, every error status, bitwise-equal answers."""
from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from steadyclip.engine import Engine
from steadyclip.engine.prompts import get_template_set
from steadyclip.errors import InputError
from steadyclip.model.loading import load
from steadyclip.server import ServerSettings, create_app
from steadyclip.server.app import WEB_DIR

torch.set_num_threads(1)

LABELS = ["red circle", "blue square", "green triangle", "yellow star"]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _shape(colour: str, shape: str, seed: int = 0) -> bytes:
    from steadyclip.demo.shapes import render

    return _png(render(colour, shape, np.random.default_rng(seed)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load(), text_cache=None)


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine)) as c:
        yield c


def _client(engine: Engine, **settings: Any) -> TestClient:
    return TestClient(create_app(engine, settings=ServerSettings(**settings)), raise_server_exceptions=False)


def _assert_error(resp: Any, status: int, type_: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) == {"type", "message"} and err["message"]
    if type_ is not None:
        assert err["type"] == type_, err
    return err


def _expected_classify(engine: Engine, images: list[bytes], labels: list[str], templates: Any = None,
                       top_k: int = 3) -> list[dict[str, Any]]:
    """What `steadyclip classify --json` computes: preprocess -> embed_pixels -> zero-shot head."""
    tset = get_template_set(templates)
    classes = engine.class_embeddings(labels, tset)
    emb = engine.embed_pixels(torch.stack([engine.preprocess(b) for b in images]))
    return [r.to_dict(with_provenance=False) for r in
            engine.classify_embeddings(emb, classes, labels, tset, top_k=top_k)]


# ---- the happy paths ---------------------------------------------------------------------------
def test_health_ready_and_model(client: TestClient, engine: Engine) -> None:
    assert client.get("/healthz").json()["status"] == "alive"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    doc = client.get("/v1/model").json()
    info = engine.loaded.info
    assert doc["model"]["weights_sha256"] == info.weights_sha256
    assert doc["model"]["fingerprint"] == info.fingerprint
    assert doc["provenance"]["profile"] == "strict"
    assert doc["golden"]["sha256"] == ready.json()["golden_sha256"]
    assert doc["limits"]["auth"] == "none" and "token" not in doc["limits"]
    assert "red circle" in doc["suggested_labels"]


def test_classify_multipart_is_bitwise_the_cli_computation(client: TestClient, engine: Engine) -> None:
    img = _shape("red", "circle")
    resp = client.post("/v1/classify", files={"image": ("red.png", img, "image/png")},
                       data={"labels": LABELS})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    row = doc["results"][0]
    assert row["source"] == "red.png" and doc["errors"] == 0
    assert row["top"][0]["label"] == "red circle"
    expected = _expected_classify(engine, [img], LABELS)[0]
    assert row["top"] == expected["top"] and row["probs"] == expected["probs"]  # floats round-trip exactly
    prov = doc["provenance"]
    assert prov["fingerprint"] == engine.loaded.info.fingerprint and prov["template_set"] == "photo"


def test_classify_json_multi_image_templates_and_top_k(client: TestClient, engine: Engine) -> None:
    imgs = [_shape("blue", "square", 1), _shape("green", "triangle", 2)]
    body = {"images": [_b64(imgs[0]), "data:image/png;base64," + _b64(imgs[1])], "names": ["a", "b"],
            "labels": LABELS, "templates": "openai-imagenet", "top_k": 2}
    doc = client.post("/v1/classify", json=body).json()
    expected = _expected_classify(engine, imgs, LABELS, "openai-imagenet", top_k=2)
    assert [r["source"] for r in doc["results"]] == ["a", "b"]
    for got, exp in zip(doc["results"], expected):
        assert got["top"] == exp["top"] and got["probs"] == exp["probs"] and len(got["top"]) == 2
    assert doc["provenance"]["template_set"] == "openai-imagenet"
    custom = client.post("/v1/classify", json={**body, "templates": ["a drawing of a {}.", "{}"]}).json()
    assert custom["provenance"]["template_set"] == "custom"


def test_multipart_labels_one_per_line_equal_repeated_fields(client: TestClient) -> None:
    img = _shape("yellow", "star")
    a = client.post("/v1/classify", files={"image": ("s.png", img)}, data={"labels": "\n".join(LABELS) + "\n"})
    b = client.post("/v1/classify", files={"image": ("s.png", img)}, data={"labels": LABELS})
    assert a.status_code == 200 and a.json() == b.json()


def test_embed_images_and_texts_bitwise(client: TestClient, engine: Engine) -> None:
    img = _shape("purple", "cross")
    doc = client.post("/v1/embed", json={"images": [_b64(img)], "texts": ["a photo of a red circle."]}).json()
    want_img = engine.embed_images([img])[0]
    want_txt = engine.embed_texts(["a photo of a red circle."])[0]
    assert np.array(doc["images"][0]["embedding"], dtype=np.float32).tobytes() == want_img.tobytes()
    assert np.array(doc["texts"][0]["embedding"], dtype=np.float32).tobytes() == want_txt.tobytes()
    b64 = client.post("/v1/embed", files={"image": ("p.png", img)}, data={"encoding": "base64"}).json()
    assert base64.b64decode(b64["images"][0]["embedding"]) == want_img.astype("<f4").tobytes()
    assert b64["images"][0]["source"] == "p.png" and b64["texts"] == []


def test_concurrent_requests_share_micro_batches_and_get_their_own_rows(engine: Engine) -> None:
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "cyan"]
    imgs = [_shape(c, "ring", i) for i, c in enumerate(colours)]
    labels = [f"{c} ring" for c in colours]
    expected = _expected_classify(engine, imgs, labels)
    results: dict[int, Any] = {}
    with _client(engine, batch_wait_ms=200) as c:
        c.post("/v1/classify", json={"image": _b64(imgs[0]), "labels": labels})  # warm the text path

        def one(i: int) -> None:
            results[i] = c.post("/v1/classify", files={"image": (f"{i}.png", imgs[i])}, data={"labels": labels})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(imgs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = c.get("/v1/model").json()["batching"]
    for i, exp in enumerate(expected):
        row = results[i].json()["results"][0]
        assert row["probs"] == exp["probs"], f"request {i} differs when batched with others"
        assert row["top"][0]["label"] == labels[i]
    assert stats["largest_batch"] > 1, stats  # requests really were computed together


# ---- auth ---------------------------------------------------------------------------------------
def test_token_required_on_api_not_on_health_or_page(engine: Engine) -> None:
    with _client(engine, token="s3cret-token") as c:
        body = {"image": _b64(_shape("red", "circle")), "labels": LABELS}
        err = _assert_error(c.post("/v1/classify", json=body), 401, "Unauthorized")
        assert "Bearer" in err["message"]
        assert c.get("/v1/model").status_code == 401
        _assert_error(c.get("/v1/model", headers={"Authorization": "Bearer wrong"}), 401)
        _assert_error(c.get("/v1/model", headers={"Authorization": "Basic s3cret-token"}), 401)
        ok = c.post("/v1/classify", json=body, headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/").status_code == 200
        assert c.get("/v1/model", headers={"Authorization": "Bearer s3cret-token"}).json()["limits"]["auth"] == "bearer"


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEADYCLIP_TOKEN", "from-env")
    assert ServerSettings.from_env().token == "from-env"
    assert ServerSettings.from_env(token="explicit").token == "explicit"


@pytest.mark.parametrize(("overrides", "match"), [
    ({"max_images": 0}, "max_images must be >= 1"),
    ({"request_timeout_s": 0.0}, "request_timeout_s must be > 0"),
    ({"allowed_url_hosts": ("https://x.example/a",)}, "without a scheme or path"),
    ({"token": "  "}, "token is blank"),
])
def test_bad_settings_are_input_errors_that_say_what_to_do(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        ServerSettings(**overrides)


# ---- size limits --------------------------------------------------------------------------------
def test_body_over_limit_by_content_length_is_413(engine: Engine) -> None:
    with _client(engine, max_body_bytes=10_000) as c:
        big = b"\x89PNG" + bytes(20_000)
        _assert_error(c.post("/v1/classify", files={"image": ("big.png", big)}, data={"labels": LABELS}),
                      413, "PayloadTooLarge")


def test_body_over_limit_when_streamed_without_length_is_413(engine: Engine) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"x" * 1000

    with _client(engine, max_body_bytes=10_000) as c:
        resp = c.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
        _assert_error(resp, 413, "PayloadTooLarge")


def test_too_many_pixels_is_413(engine: Engine) -> None:
    huge = _png(Image.new("RGB", (400, 300), "white"))
    with _client(engine, max_pixels=100_000) as c:
        err = _assert_error(c.post("/v1/classify", files={"image": ("huge.png", huge)}, data={"labels": LABELS}),
                            413, "ImageTooLargeError")
        assert "huge.png" in err["message"]


# ---- malformed input: always 4xx ---------------------------------------------------------------
@pytest.mark.parametrize("body, status, type_", [
    ({"image": "!!not base64!!", "labels": LABELS}, 422, "ImageDecodeError"),
    ({"image": _b64(b"definitely not an image"), "labels": LABELS}, 422, "ImageDecodeError"),
    ({"labels": LABELS}, 422, "ImageSourceError"),
    ({"image": "AAAA", "labels": []}, 422, "LabelError"),
    ({"image": "AAAA", "labels": ["a", " a "]}, 422, "LabelError"),
    ({"image": "AAAA", "labels": ["ok", "   "]}, 422, "LabelError"),
    ({"image": "AAAA", "labels": [f"l{i}" for i in range(300)]}, 422, "LabelError"),
    ({"image": "AAAA", "labels": ["x" * 2000, "b"]}, 422, None),
    ({"image": "AAAA", "labels": "red circle"}, 422, "ValidationError"),
    ({"image": "AAAA", "labels": LABELS, "top_k": 0}, 422, None),
    ({"image": "AAAA", "labels": LABELS, "templates": "/etc/passwd"}, 422, "TemplateError"),
    ({"image": "AAAA", "labels": LABELS, "templates": ["no placeholder"]}, 422, "TemplateError"),
    ({"image": "AAAA", "labels": LABELS, "label": "typo"}, 422, "ValidationError"),
    ({"images": ["AAAA"] * 40, "labels": LABELS}, 422, None),
])
def test_bad_classify_json_is_4xx(client: TestClient, body: dict[str, Any], status: int, type_: str | None) -> None:
    _assert_error(client.post("/v1/classify", json=body), status, type_)


def test_bad_bodies_and_content_types(client: TestClient) -> None:
    _assert_error(client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}),
                  400, "BadRequest")
    _assert_error(client.post("/v1/classify", content=b"hello", headers={"content-type": "text/plain"}),
                  415, "UnsupportedMediaType")
    _assert_error(client.post("/v1/classify", content=b"x"), 415)
    _assert_error(client.post("/v1/classify", content=b"--nope\r\ngarbage",
                              headers={"content-type": "multipart/form-data; boundary=zzz"}), 400, "BadRequest")
    _assert_error(client.post("/v1/classify", content=b"garbage",
                              headers={"content-type": "multipart/form-data"}), 400, "BadRequest")
    _assert_error(client.post("/v1/classify", files={"image": ("x.png", b"garbage")}, data={"labels": LABELS}),
                  422, "ImageDecodeError")
    _assert_error(client.post("/v1/classify", files={"image": ("x.png", _shape("red", "star"))},
                              data={"labels": LABELS, "top_k": "three"}), 422)
    _assert_error(client.get("/v1/classify"), 405)
    _assert_error(client.get("/no/such/page"), 404, "NotFound")


def test_server_never_opens_client_named_files(client: TestClient, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(_shape("red", "circle"))
    err = _assert_error(client.post("/v1/classify", files={"x": ("x", b"")},
                                    data={"image": str(secret), "labels": LABELS}), 422, "ImageSourceError")
    assert "never opens paths" in err["message"]
    _assert_error(client.post("/v1/classify", json={"image": str(secret), "labels": LABELS}), 422)
    _assert_error(client.post("/v1/classify", files={"image": ("a.png", _shape("red", "circle"))},
                              data={"labels": LABELS, "templates": str(secret)}), 422, "TemplateError")


def test_bad_embed_requests(client: TestClient) -> None:
    _assert_error(client.post("/v1/embed", json={}), 422)
    _assert_error(client.post("/v1/embed", json={"texts": ["t"] * 300}), 422)
    _assert_error(client.post("/v1/embed", json={"texts": ["y" * 5000]}), 422)
    _assert_error(client.post("/v1/embed", json={"texts": ["a"], "encoding": "hex"}), 422, "ValidationError")
    _assert_error(client.post("/v1/embed", files={"image": ("x.png", b"nope")}), 422, "ImageDecodeError")


# ---- timeouts and readiness ---------------------------------------------------------------------
def test_work_predicted_past_the_timeout_is_429_and_work_that_overruns_it_is_504(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    form = {"files": {"image": ("a.png", _shape("red", "circle"))}, "data": {"labels": LABELS}}
    with _client(engine, request_timeout_s=0.001, batch_wait_ms=100) as c:  # the start-up probe measured the pace
        resp = c.post("/v1/classify", **form)  # type: ignore[arg-type]
        err = _assert_error(resp, 429, "Overloaded")
        assert "request timeout" in err["message"] and int(resp.headers["retry-after"]) >= 1
    real = engine.class_embeddings

    def slow(*args: object, **kw: object) -> object:
        time.sleep(0.6)  # admitted (the image work is quick), then overruns: the client hears 504, not silence
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "class_embeddings", slow)
    with _client(engine, request_timeout_s=0.3) as c:
        err = _assert_error(c.post("/v1/classify", **form), 504, "Timeout")  # type: ignore[arg-type]
        assert "timeout" in err["message"]
        assert c.get("/healthz").status_code == 200


def test_readyz_fails_when_weights_are_tampered() -> None:
    tampered = Engine(load(), text_cache=None)
    with _client(tampered) as c:
        assert c.get("/readyz").status_code == 200
        with torch.no_grad():  # nudge one value per image-tower tensor, as a bad in-place edit would
            for p in tampered.loaded.model.get_submodule("visual").parameters():
                p.view(-1)[0] += 0.25
        resp = c.get("/readyz")
        assert resp.status_code == 503, resp.text
        doc = resp.json()
        assert doc["ready"] is False and doc["error"]["type"] == "NotReady"
        assert doc["problem"]
        assert c.get("/healthz").status_code == 200  # alive, just not ready


# ---- the web page and docs ----------------------------------------------------------------------
def test_web_page_is_local_only(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for f in WEB_DIR.iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f"{f.name} loads externally"
        assert client.get(f"/static/{f.name}").status_code == 200
    assert client.get("/docs").status_code == 200 and client.get("/redoc").status_code == 404
    spec = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/embed", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
