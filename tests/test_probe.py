"""Behaviour pinning: lock stores probe outputs, verify recomputes them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from steadyclip.cli import cli
from steadyclip.engine.probe import _pack, _unpack


def _run(*args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return res.exit_code, json.loads(res.stdout)


@pytest.fixture
def locked(demo_copy: Path, tmp_path: Path) -> Path:
    lock = tmp_path / "model.lock"
    code, doc = _run("lock", "steadyclip-shapes", "--pretrained", str(demo_copy), "-o", str(lock), "--json")
    assert code == 0
    assert doc["probe"]["images"]["shape"][0] == 6
    return lock


def _edit_probe(lock: Path, *, delta: float, stack: dict[str, str] | None = None) -> None:
    doc = json.loads(lock.read_text())
    probe = doc["probe"]
    arr = _unpack(probe["images"]).copy()
    arr[0, 0] += delta
    probe["images"] = _pack(arr)
    if stack:
        probe["stack"].update(stack)
    lock.write_text(json.dumps(doc))


def test_same_stack_is_bitwise_identical(locked: Path) -> None:
    code, doc = _run("verify", "--lock", str(locked), "--json")
    assert code == 0
    assert doc["probe"]["status"] == "bitwise-identical"


def test_any_change_on_the_same_stack_is_a_regression(locked: Path) -> None:
    _edit_probe(locked, delta=1e-7)
    code, doc = _run("verify", "--lock", str(locked), "--json")
    assert code == 3
    assert doc["probe"]["status"] == "regression"


def test_other_stack_small_drift_is_reported_and_accepted(locked: Path) -> None:
    _edit_probe(locked, delta=2e-6, stack={"torch": "2.99.0"})
    code, doc = _run("verify", "--lock", str(locked), "--json")
    assert code == 0
    assert doc["probe"]["status"] == "within-tolerance"
    assert doc["probe"]["stack_differences"]["torch"][0] == "2.99.0"
    assert 1e-6 < doc["probe"]["max_abs"] < 1e-5


def test_probe_stack_is_the_software_stack_and_an_open_clip_change_is_another_stack(locked: Path) -> None:
    from steadyclip.numerics import identity

    stack = json.loads(locked.read_text())["probe"]["stack"]
    assert identity.software_stack().items() <= stack.items()
    _edit_probe(locked, delta=2e-6, stack={"open_clip_torch": "0.0.1"})
    code, doc = _run("verify", "--lock", str(locked), "--json")
    assert code == 0
    assert doc["probe"]["status"] == "within-tolerance"
    assert set(doc["probe"]["stack_differences"]) == {"open_clip_torch"}


def test_probe_from_before_the_full_software_stack_is_still_bitwise_checked(locked: Path) -> None:
    from steadyclip.numerics import identity

    doc = json.loads(locked.read_text())
    stack = doc["probe"]["stack"]
    for key in set(identity.software_stack()) - {"torch", "numpy", "pillow"}:  # what older locks lacked
        del stack[key]
    locked.write_text(json.dumps(doc))
    code, out = _run("verify", "--lock", str(locked), "--json")
    assert (code, out["probe"]["status"]) == (0, "bitwise-identical")
    _edit_probe(locked, delta=1e-7)
    code, out = _run("verify", "--lock", str(locked), "--json")
    assert (code, out["probe"]["status"], out["probe"]["stack_differences"]) == (3, "regression", {})


def test_other_stack_large_drift_fails(locked: Path) -> None:
    _edit_probe(locked, delta=0.05, stack={"cpu_capability": "NEON"})
    code, doc = _run("verify", "--lock", str(locked), "--json")
    assert code == 3
    assert doc["probe"]["status"] == "drift"


def test_edited_probe_data_is_detected(locked: Path) -> None:
    doc = json.loads(locked.read_text())
    raw = bytearray(np.zeros(4, dtype=np.float32).tobytes())
    import base64

    doc["probe"]["texts"]["data"] = base64.b64encode(bytes(raw)).decode()
    locked.write_text(json.dumps(doc))
    res = CliRunner().invoke(cli, ["verify", "--lock", str(locked)], catch_exceptions=False)
    assert res.exit_code == 3
    assert "probe data does not match" in res.stderr
