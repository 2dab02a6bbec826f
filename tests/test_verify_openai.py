"""``steadyclip verify ANSWER --inputs REQUEST``: OpenAI-style /v1/embeddings answers, which hold only digests.

The answers come from the real ``openai`` client (and plain HTTP) against the app in-process: a
uvicorn process would add ~18 s of start-up here for the same bytes on the wire.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from _server_fixtures import demo_images
from click.testing import CliRunner
from fastapi.testclient import TestClient

from steadyclip.cli import cli
from steadyclip.engine import Engine
from steadyclip.errors import InputError, ResultFileError
from steadyclip.model.loading import load
from steadyclip.server import ServerSettings, create_app
from steadyclip.verify import verify_results

torch.set_num_threads(1)

MODEL = "steadyclip-demo"
TEXTS = ["a red circle", "a photo of a blue square.", "green triangle"]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:
    engine = Engine(load(), replicas=1, text_cache=None)
    with TestClient(create_app(engine, settings=ServerSettings())) as client:
        yield client


@pytest.fixture(scope="module")
def saved(http: TestClient, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Answers saved for an audit, and the requests that made them: name -> file."""
    root = tmp_path_factory.mktemp("openai-verify")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    files: dict[str, Path] = {}

    def save(name: str, doc: Any) -> None:
        files[name] = root / f"{name}.json"
        files[name].write_text(doc if isinstance(doc, str) else json.dumps(doc))

    # the client asks for base64 and decodes it to floats; model_dump_json keeps steadyclip's extra fields
    save("texts", client.embeddings.create(model=MODEL, input=TEXTS).model_dump_json())
    save("texts-request", {"model": MODEL, "input": TEXTS})
    raw = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS[0], "encoding_format": "base64"})
    assert raw.status_code == 200, raw.text
    save("raw-base64", raw.text)
    uris = [data_uri(p) for p in demo_images(root / "images")[:2]]
    body = {"model": MODEL, "input": uris, "modality": "image"}
    images = http.post("/v1/embeddings", json=body)
    assert images.status_code == 200, images.text
    save("images", images.text)
    save("images-request", body)
    return files


def test_the_answer_keeps_openais_shape_and_records_digests(saved: dict[str, Path]) -> None:
    doc = json.loads(saved["texts"].read_text())
    assert [set(d) for d in doc["data"]] == [{"object", "index", "embedding"}] * 3  # data items untouched
    inputs = doc["recipe"]["inputs"]
    assert inputs["modality"] == "text" and len(inputs["sha256"]) == 3 and len(inputs["sha256"][0]) == 64
    assert doc["recipe"]["settings"]["micro_batch"] >= 1 and doc["provenance"]["weights_sha256"]


def test_text_answer_verifies_bitwise_with_the_request_sent(saved: dict[str, Path]) -> None:
    code, out, _ = run("verify", str(saved["texts"]), "--inputs", str(saved["texts-request"]), "--json")
    report = json.loads(out)
    assert code == 0 and report["kind"] == "embeddings" and report["totals"]["bitwise"] == 3, out
    assert [r["source"] for r in report["rows"]] == TEXTS
    # a base64 answer, and the inputs as a bare JSON string (the request's 'input' alone)
    bare = saved["texts"].parent / "one.json"
    bare.write_text(json.dumps(TEXTS[0]))
    assert verify_results(saved["raw-base64"], inputs=bare).verdict == "bitwise"


def test_without_inputs_every_row_is_input_missing_and_says_pass_inputs(saved: dict[str, Path]) -> None:
    code, out, err = run("verify", str(saved["texts"]))
    assert code == 3 and "input_missing" in out and "--inputs" in out and "Traceback" not in out + err
    report = verify_results(saved["texts"])
    assert {r.verdict for r in report.rows} == {"input_missing"} and report.verdict == "input_missing"
    assert all(r.reason is not None and "pass --inputs REQUEST.json" in r.reason for r in report.rows)


def test_a_changed_text_or_an_edited_number_is_caught(saved: dict[str, Path], tmp_path: Path) -> None:
    report = verify_results(saved["texts"], inputs=[TEXTS[0], "a red square", TEXTS[2]])
    assert [r.verdict for r in report.rows] == ["bitwise", "input_changed", "bitwise"]
    doc = json.loads(saved["texts"].read_text())
    doc["data"][2]["embedding"][0] += 1e-3
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    code, out, _ = run("verify", str(edited), "--inputs", str(saved["texts-request"]), "--json")
    assert code == 3 and [r["verdict"] for r in json.loads(out)["rows"]] == ["bitwise", "bitwise", "mismatch"]


def test_image_answer_verifies_against_the_data_uris_sent(saved: dict[str, Path]) -> None:
    code, out, _ = run("verify", str(saved["images"]), "--inputs", str(saved["images-request"]), "--json")
    assert code == 0 and json.loads(out)["totals"]["bitwise"] == 2, out
    uris: list[str] = json.loads(saved["images-request"].read_text())["input"]
    report = verify_results(saved["images"], inputs=[uris[1], "https://example.com/a.png"])
    assert report.rows[0].verdict == "input_changed" and report.rows[0].source == "input[0]"
    assert report.rows[1].verdict == "input_missing" and "fetches nothing" in str(report.rows[1].reason)


def test_bad_inputs_are_typed_errors_that_say_what_to_pass(saved: dict[str, Path], tmp_path: Path) -> None:
    cases = {
        "notes.txt": ("texts", "a red circle\n"),
        "no-input.json": ("texts", json.dumps({"model": MODEL, "inputs": TEXTS})),
        "numbers.json": ("texts", json.dumps([1, 2, 3])),
        "two.json": ("texts", json.dumps(TEXTS[:2])),
        "images-for-texts.json": ("texts", json.dumps({"model": MODEL, "input": TEXTS, "modality": "image"})),
        "not-base64.json": ("images", json.dumps(["data:image/png;base64,@@@", "x"])),
    }
    for name, (answer, text) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(InputError):
            verify_results(saved[answer], inputs=path)
        code, stdout, err = run("verify", str(saved[answer]), "--inputs", str(path), "--json")
        assert code == 1 and stdout == "" and "InputError" in err and "Traceback" not in err, name
    # --inputs is for answers without inputs; a missing file is a usage error
    code, _, err = run("verify", str(saved["images-request"]), "--inputs", str(saved["texts-request"]))
    assert code == 1 and "ResultFileError" in err
    assert run("verify", str(saved["texts"]), "--inputs", str(tmp_path / "gone.json"))[0] == 2


def test_an_answer_without_digests_is_a_result_file_error(saved: dict[str, Path], tmp_path: Path) -> None:
    doc = json.loads(saved["texts"].read_text())
    del doc["recipe"]["inputs"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    with pytest.raises(ResultFileError, match="recompute it with this version"):
        verify_results(old, inputs=saved["texts-request"])
