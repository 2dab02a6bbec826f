"""`steadyclip doctor --script`: the user's own unchanged script, diagnosed by running it.

The scripts are ``tests/scripts/shapes_classify.py`` (the bundled demo model, with
a flag per classic mistake) and small ones written to ``tmp_path``. Each case is
run through the CLI as a user would, with ``--runs 2`` to keep it quick.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from steadyclip.cli import cli

SCRIPT = Path(__file__).parent / "scripts" / "shapes_classify.py"


def doctor(*args: str) -> Result:
    return CliRunner().invoke(cli, ["doctor", *args], catch_exceptions=False)


def diagnose(script: Path, *script_args: str, runs: int = 2) -> tuple[int, dict[str, Any]]:
    r = doctor("--script", str(script), "--runs", str(runs), "--json", "--", *script_args)
    assert r.exit_code in (0, 3), r.output
    doc: dict[str, Any] = json.loads(r.stdout)
    return r.exit_code, doc


@pytest.fixture(scope="module")
def healthy() -> tuple[int, dict[str, Any]]:
    """The demo script with every mistake fixed: what each case's fix, applied, turns the script into."""
    return diagnose(SCRIPT)


def test_healthy_script_is_stable_exit_0_and_runs_only_as_is(healthy: tuple[int, dict[str, Any]]) -> None:
    code, doc = healthy
    assert code == 0
    assert doc["verdict"] == "stable"
    assert [c for c in doc["causes"] if c["level"] == "problem"] == []
    assert doc["timing"]["interventions"] == 0  # nothing suspicious seen: nothing re-run
    assert all(p["stdout"].startswith("[") for p in doc["script"]["processes"])  # the script's own print
    # only the as-is runs ran (the doctor's overhead is a benchmark figure, not a unit-test timing)
    assert doc["timing"]["processes"] == len(doc["script"]["processes"])


# (flag, expected top cause, the line the cause points at, the kept fix)
CASES = [
    ("--no-eval", "train_mode", "open_clip.create_model_and_transforms", "eval"),
    ("--train-transform", "preprocess_random", "open_clip.create_model_and_transforms", "eval_transform"),
    ("--autocast", "precision_drift", "model.encode_image(pixels)", "no_autocast"),
    ("--no-weights", "random_init", "open_clip.create_model_and_transforms", "pin_weights"),
]


@pytest.mark.slow  # about 4 script runs each (~10-40 s on a shared 2-vCPU machine)
@pytest.mark.parametrize(("flag", "cause", "code_at", "fix"), CASES, ids=[c[0] for c in CASES])
def test_each_mistake_has_the_right_top_cause_at_the_users_line_and_its_fix_makes_it_stable(
        flag: str, cause: str, code_at: str, fix: str, healthy: tuple[int, dict[str, Any]], tmp_path: Path) -> None:
    before = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()
    page = tmp_path / "report.html"
    r = doctor("--script", str(SCRIPT), "--runs", "2", "--json", "--html", str(page), "--", flag)
    code, doc = r.exit_code, json.loads(r.stdout)
    assert hashlib.sha256(SCRIPT.read_bytes()).hexdigest() == before  # the user's file is untouched
    assert code == 3, doc["causes"]
    top = doc["causes"][0]
    assert top["id"] == cause and top["level"] == "problem"
    assert top["fix"].startswith("# shapes_classify.py:")  # points at the user's file and line
    assert code_at in top["fix"]
    assert fix in doc["script"]["kept_fixes"]
    fixed = [p for p in doc["script"]["processes"] if p["fixes"] and fix in p["fixes"]]
    assert len({p["stdout"] for p in fixed[:2]}) == 1  # with the fix, the script prints the same every run
    t = doc["timing"]
    assert t["interventions"] >= 2 and t["processes"] == len(doc["script"]["processes"])
    html = page.read_text()
    assert cause in html and "shapes_classify.py" in html and f"with {fix}" in html
    # the fix applied to the script (drop the mistake) gives the healthy script: stable, exit 0
    assert healthy[0] == 0


def test_random_weights_are_wrong_even_when_runs_agree(tmp_path: Path) -> None:
    script = tmp_path / "seeded.py"
    demo = Path(__file__).parents[1] / "src" / "steadyclip" / "demo"
    text = SCRIPT.read_text().replace('DEMO = os.path.join(HERE, "..", "..", "src", "steadyclip", "demo")',
                                      f"DEMO = {str(demo)!r}")
    script.write_text(text.replace("args = parser.parse_args()", "args = parser.parse_args()\ntorch.manual_seed(0)"))
    r = doctor("--script", str(script), "--runs", "2", "--", "--no-weights")  # the rich text report
    assert r.exit_code == 3
    assert "your script printed (run 1 of 2, as-is)" in r.stdout
    assert "#1 random_init" in r.stdout
    assert "seeded.py:" in r.stdout and "without pretrained weights" in r.stdout
    assert "pin_weights" not in r.stdout  # runs agree: nothing to pin, yet the weights are wrong


def test_failing_script_exits_1_with_its_own_traceback(tmp_path: Path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("print('loading')\nimport json\njson.loads('{not json')\n")
    r = doctor("--script", str(script), "--runs", "2")
    assert r.exit_code == 1
    assert "loading" in r.stdout
    assert 'broken.py", line 3' in r.stderr and "JSONDecodeError" in r.stderr
    assert "boot.py" not in r.stderr and "runpy" not in r.stderr  # the launcher's frames are not the user's
    assert "ScriptError" in r.stderr


def test_script_sees_its_own_argv_name_and_path(tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text("VALUE = 41\n")
    script = tmp_path / "uses_helper.py"
    script.write_text("import sys\nimport helper\nassert __name__ == '__main__'\n"
                      "assert sys.argv == [sys.argv[0], 'x', '--y'], sys.argv\nprint(helper.VALUE + 1)\n")
    r = doctor("--script", str(script), "--runs", "2", "--", "x", "--y")
    assert r.exit_code == 1  # ran fine, but never ran an open_clip model: nothing to diagnose
    assert "never called encode_image" in r.stderr


@pytest.mark.slow  # 6 script runs: 2 as-is, 2 with both fixes, 1 with each fix put back (it moved: proven)
def test_two_mistakes_at_once_each_proven_by_putting_it_back() -> None:
    code, doc = diagnose(SCRIPT, "--no-eval", "--train-transform")
    assert code == 3
    assert sorted(doc["script"]["kept_fixes"]) == ["eval", "eval_transform"]
    problems = {c["id"] for c in doc["causes"] if c["level"] == "problem"}
    assert {"train_mode", "preprocess_random"} <= problems
    assert doc["timing"]["processes"] == 6
    assert {c["id"]: c["status"] for c in doc["checks"]}["fixed_runs_agree"] == "ok"
