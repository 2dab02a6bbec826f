"""``diagnose_script``: run the user's own open_clip script unchanged, and prove why its output moves.

    >>> d = diagnose_script("my_script.py", runs=3)
    >>> d.diagnosis.top.id, d.diagnosis.top.summary
    ('random_init', 'my_script.py:3: model created here without pretrained weights ...')

The script runs ``runs`` times in fresh processes of the same Python with the
observer of ``_script_child`` injected (the file is never edited). Every
suspected cause the observer saw is then removed at once; each removal is put
back in turn (one process, a second only when the first moved nothing) to
prove which ones matter.

The verdict: exit 0 = the runs agree and nothing makes the results wrong; 3 =
the runs disagree or the results are wrong (random or non-finite weights, train
mode, a config that does not match the weights), each cause proven by an
intervention whose effect is measured on the outputs the script produced; a
crash is a :class:`ScriptError` carrying what could be diagnosed about it.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steadyclip.doctor._script_child import observer
from steadyclip.doctor.result import (
    Cause,
    CheckStatus,
    Diagnosis,
    Run,
    jsonable,
    rank_causes,
    verdict_of,
)
from steadyclip.doctor.script_causes import (
    Evidence,
    build_causes,
    candidates,
    gather,
    measure,
)
from steadyclip.doctor.script_failure import diagnose_failure
from steadyclip.doctor.script_trace import (
    Measured,
    RunTrace,
    first_divergence,
    read_trace,
)
from steadyclip.errors import InputError

__all__ = ["ScriptDiagnosis", "ScriptError", "ScriptRun", "diagnose_script", "error_document"]

_BOOT = Path(observer.__file__).with_name("boot.py")
_ABLATION_RUNS = 2
BUDGET_MARGIN = 0.15
# Wrong whatever else is found: nothing measured on random, NaN or mismatched weights means much, so first.
_ROOTS = ("random_init", "non_finite", "config_mismatch", "weights_changed")


class ScriptError(InputError):
    """The user's script itself failed (non-zero exit): ``run`` holds its output and traceback, ``causes`` what
    the observer's records explain about it (which weights file was bad, and how to fix it)."""

    def __init__(self, message: str, run: ScriptRun, causes: tuple[Cause, ...] = (), script: str = "",
                 args: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.run, self.causes, self.script, self.script_args = run, causes, script, tuple(args)

    def to_dict(self) -> dict[str, Any]:
        """The same document as a diagnosis, with ``verdict: "error"``: ``--json`` prints one for every outcome."""
        doc = error_document(self, self.script, self.script_args)
        doc["causes"] = [c.to_dict() for c in self.causes]
        doc["script"]["processes"] = [self.run.to_dict()]
        doc["timing"] = {"processes": self.run.index + 1, "failed_run": self.run.index + 1}
        return doc


def error_document(e: BaseException, script: str | os.PathLike[str], args: Sequence[str]) -> dict[str, Any]:
    """A diagnosis document for a run that ended in an error (the schema's keys, ``verdict: "error"``)."""
    return {"verdict": "error", "error": f"{type(e).__name__}: {e}", "causes": [], "advice": [], "runs": [],
            "checks": [], "labels": [], "images": [], "environment": jsonable({"script": os.fspath(script)}),
            "script": {"path": os.fspath(script), "args": list(args), "kept_fixes": [], "processes": []},
            "timing": {}}


@dataclass(frozen=True)
class ScriptRun:
    """One process: which fixes the observer applied, what the script printed, its exit status and time."""

    index: int
    fixes: tuple[str, ...]
    returncode: int
    seconds: float
    stdout: str
    stderr: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "fixes": list(self.fixes), "returncode": self.returncode,
                "seconds": round(self.seconds, 3), "stdout": self.stdout, "stderr": self.stderr}


@dataclass(frozen=True)
class ScriptDiagnosis:
    """The diagnosis (same schema as :func:`steadyclip.diagnose`) plus the script's runs and the timing."""

    script: str
    args: tuple[str, ...]
    diagnosis: Diagnosis
    processes: tuple[ScriptRun, ...]
    kept_fixes: tuple[str, ...]
    timing: dict[str, Any]

    @property
    def stable(self) -> bool:
        return self.diagnosis.stable

    def to_dict(self) -> dict[str, Any]:
        doc = self.diagnosis.to_dict()
        doc["script"] = {"path": self.script, "args": list(self.args), "kept_fixes": list(self.kept_fixes),
                         "processes": [p.to_dict() for p in self.processes]}
        doc["timing"] = dict(self.timing)
        return doc


class _Runner:
    """Starts the script in fresh processes and keeps every run's output (the user's symptom)."""

    def __init__(self, script: Path, args: Sequence[str], workdir: Path, timeout: float | None) -> None:
        self.script, self.args, self.workdir, self.timeout = script, list(args), workdir, timeout
        self.runs: list[ScriptRun] = []
        self.env = _child_env()

    def run(self, fixes: Sequence[str]) -> RunTrace:
        n = len(self.runs)
        trace = self.workdir / f"run{n}.jsonl"
        key = "-".join(sorted(fixes)) or "as-is"
        env = dict(self.env, **{observer.TRACE_ENV: str(trace), observer.FIXES_ENV: ",".join(sorted(fixes)),
                                observer.PIN_DIR_ENV: str(self.workdir / f"pin-{key}")})
        if "strict_flags" in fixes:  # these must be in place before CUDA / MKL start
            env.update(CUBLAS_WORKSPACE_CONFIG=":4096:8", MKL_CBWR="AUTO,STRICT")
        (self.workdir / f"pin-{key}").mkdir(exist_ok=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(_BOOT), str(self.script), *self.args], env=env,
                                  capture_output=True, text=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise InputError(f"{self.script.name} ran longer than {self.timeout} s (run {n + 1}); pass a larger "
                             "timeout, or give the script arguments that make it quicker") from e
        seconds = time.perf_counter() - t0
        rec = ScriptRun(n, tuple(sorted(fixes)), proc.returncode, seconds, proc.stdout, proc.stderr)
        self.runs.append(rec)
        out = read_trace(trace, returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, seconds=seconds)
        if proc.returncode != 0:
            what = "as-is" if not fixes else f"with the fixes {', '.join(sorted(fixes))}"
            causes = diagnose_failure(out)
            hint = f"; {causes[0].id}: {causes[0].summary}" if causes else ""
            raise ScriptError(f"{self.script.name} failed (exit {proc.returncode}, run {n + 1}, {what}); its own "
                              f"output and traceback are shown above{hint}", rec, causes, str(self.script), self.args)
        return out


def _child_env() -> dict[str, str]:
    """The environment the user's script would get: without what importing steadyclip added to this process."""
    from steadyclip.numerics.early import early_state

    env = dict(os.environ)
    state = early_state()
    if state.get("value") is not None and state.get("user_value") is None:
        env.pop("MKL_CBWR", None)
    if "cublas_user_value" in state and state["cublas_user_value"] is None:
        env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    return env


def diagnose_script(script: str | os.PathLike[str], args: Sequence[str] = (), *, runs: int = 3,
                    timeout: float | None = None) -> ScriptDiagnosis:
    """Run ``python script args`` ``runs`` times unchanged, find what makes its open_clip outputs move, prove it.

    Raises:
        ScriptError: the script itself exited non-zero (its output is in ``.run``).
        InputError: no such script, bad ``runs``, or the script never ran an open_clip model.
    """
    path = Path(script).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"no script at {os.fspath(script)!r}: give the path of the Python file you run")
    if not isinstance(runs, int) or runs < 2:
        raise InputError(f"runs must be an integer >= 2 (two runs are needed to compare), got {runs!r}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="steadyclip-doctor-") as tmp:
        runner = _Runner(path, args, Path(tmp), timeout)
        as_is = [runner.run(()) for _ in range(runs)]
        if not as_is[0].calls:
            raise InputError(f"{path.name} ran but never called encode_image/encode_text/forward on an open_clip "
                             "model; doctor --script sees models created through open_clip's create_model* functions")
        ev = gather(as_is)
        kept, fixed, measured = _intervene(runner, as_is, ev)
    problems, advice = build_causes(as_is[0], ev, measured, fixed)
    causes = _roots_first(rank_causes(problems))
    wall = time.perf_counter() - t0
    d = _diagnosis(as_is, fixed, causes, ev, kept, path, wall, tuple(advice))
    timing = _timing(runner.runs, runs, wall)
    d.environment["timing"] = timing
    return ScriptDiagnosis(str(path), tuple(args), d, tuple(runner.runs), tuple(kept), timing)


def _roots_first(causes: tuple[Cause, ...]) -> tuple[Cause, ...]:
    return tuple(sorted(causes, key=lambda c: _ROOTS.index(c.id) if c.id in _ROOTS else len(_ROOTS)))


def _intervene(runner: _Runner, as_is: list[RunTrace], ev: Evidence,
               ) -> tuple[list[str], list[RunTrace], list[Measured]]:
    """All suspected fixes at once (+ seeding if that is not enough), then each one put back to prove it matters."""
    fixes = candidates(ev)
    if not fixes and ev.stable:
        return [], as_is, []
    if not fixes:
        fixes = ["seed"]
    # runs that agreed as-is need two fixed runs to show they still agree, not one per as-is run
    n = len(as_is) if not ev.stable else min(2, len(as_is))
    cache: dict[frozenset[str], list[RunTrace]] = {frozenset(): as_is}
    fixed = [runner.run(fixes) for _ in range(n)]
    if len({r.signature for r in fixed}) > 1 and "seed" not in fixes:
        fixes = [*fixes, "seed"]
        fixed = [runner.run(fixes) for _ in range(n)]
    cache[frozenset(fixes)] = fixed
    measured = []
    for fix in fixes:
        rest = frozenset(fixes) - {fix}
        if rest not in cache:
            cache[rest] = [runner.run(sorted(rest))]
            m = measure(fix, cache[rest], fixed)
            if not m.needed:  # moved nothing once: a second run shows whether it moves run to run
                cache[rest].extend(runner.run(sorted(rest)) for _ in range(_ABLATION_RUNS - 1))
        measured.append(measure(fix, cache[rest], fixed))
    kept = [m.fix for m in measured if m.needed]
    return kept, fixed, measured


def _rows(r: RunTrace) -> tuple[tuple[float, ...], ...]:
    p = r.probabilities()
    return () if p is None else tuple(tuple(float(x) for x in row) for row in p)


def _diagnosis(as_is: list[RunTrace], fixed: list[RunTrace], causes: tuple[Cause, ...], ev: Evidence,
               kept: list[str], path: Path, wall: float, advice: tuple[Cause, ...]) -> Diagnosis:
    first = as_is[0]
    probs = first.probabilities()
    labels = first.labels() or (tuple(f"text {j + 1}" for j in range(probs.shape[1])) if probs is not None else ())
    images = tuple(f"image {i + 1}" for i in range(probs.shape[0])) if probs is not None else ()
    runs = tuple(Run(i, _rows(a), _rows(fixed[i % len(fixed)]) if fixed is not as_is else _rows(a))
                 for i, a in enumerate(as_is))
    div = first_divergence(as_is)
    checks = [CheckStatus("runs_agree", "ok" if div is None else "problem",
                          f"all {len(as_is)} runs gave bitwise-identical outputs at every call" if div is None else
                          f"outputs change from call {div['call']} on ({div['site']}): "
                          f"{div['calls_changed']} of {div['calls_total']} calls differ")]
    if fixed is not as_is:
        stable_fixed = len({r.signature for r in fixed}) == 1
        checks.append(CheckStatus("fixed_runs_agree", "ok" if stable_fixed else "problem",
                                  f"with {', '.join(kept) or 'no fix'}: "
                                  + ("every output identical" if stable_fixed else "outputs still change")))
    ids = {c.id for c in causes}
    for cid, ok, detail in (("random_init", not ev.random_models, "every model ran with loaded weights"),
                            ("non_finite", not ev.nonfinite_calls, "every output is finite"),
                            ("config_mismatch", "config_mismatch" not in ids,
                             "every model is built as its pretrained tag expects"),
                            ("train_mode", not ev.training_calls, "every call ran in eval mode"),
                            ("preprocess_random", not ev.random_transform_calls, "no random transform made inputs"),
                            ("precision_drift", not ev.autocast_calls, "no call ran under autocast")):
        if ok:
            checks.append(CheckStatus(cid, "ok", detail))
    call = first.calls[0]
    env = {"script": str(path), "device": call.device, "flags": call.flags,
           "versions": {"python": first.versions.get("python"), "torch": first.versions.get("torch"),
                        "open_clip_torch": first.versions.get("open_clip")},  # the script's process, not ours
           "threads": call.flags.get("threads"), "MKL_CBWR": call.flags.get("MKL_CBWR"),
           "autocast": call.autocast, "first_divergence": div, "kept_fixes": kept,
           "models": {k: {"arch": m.arch, "pretrained": m.pretrained, "created_at": str(m.where),
                          "weights": [{"path": ld.get("path"), "sha256": ld.get("sha256"), "via": ld.get("via")}
                                      for ld in m.loads]} for k, m in first.models.items()},
           "seconds": round(wall, 3)}
    return Diagnosis(verdict_of(causes), causes, runs, env, tuple(checks), tuple(labels), images, advice)


def _timing(processes: list[ScriptRun], runs: int, wall: float) -> dict[str, Any]:
    """Wall time against (processes x the script's own time): what the doctor costs beyond running the script.

    When it is over budget, ``over_budget_because`` says where the time went: interventions that take longer
    than the script as-is (pinning writes and reads the whole state dict), or the doctor's own work.
    """
    own = statistics.median(p.seconds for p in processes[:runs])
    budget = len(processes) * own * (1 + BUDGET_MARGIN)
    out: dict[str, Any] = {
        "wall_seconds": round(wall, 3), "script_seconds": round(own, 3), "processes": len(processes), "runs": runs,
        "interventions": len(processes) - runs, "budget_seconds": round(budget, 3),
        "ratio": round(wall / (len(processes) * own), 3), "within_budget": wall <= budget}
    if wall > budget:
        slow = sorted((p for p in processes[runs:] if p.seconds > own * (1 + BUDGET_MARGIN)),
                      key=lambda p: -p.seconds)
        overhead = wall - sum(p.seconds for p in processes)
        why = [f"run with {', '.join(p.fixes) or 'no fix'} took {p.seconds:.1f} s vs {own:.1f} s as-is"
               for p in slow[:3]]
        if overhead > own * BUDGET_MARGIN:
            why.append(f"the doctor's own work between runs (reading traces, comparing outputs): {overhead:.1f} s")
        out["over_budget_because"] = why or ["the script's own time varies from run to run"]
    return out
