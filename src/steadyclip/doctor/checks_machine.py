"""Check: do results made on another machine disagree with this one because of its CPU?

A lock's behaviour probe was computed where the lock was made. Recomputed here with the lock's
own settings, it either matches bit for bit, or it does not; when it does not and the stacks
differ only in the CPU (vendor, model, capability), the cause is the CPU's kernels: strict's
promise is per machine. The fix is the portable profile, whose bits do not depend on the CPU.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from steadyclip.doctor.result import Cause, Findings

__all__ = ["CPU_FACTS", "check_cross_machine"]

CHECK_ID = "cross_machine_numerics"
CPU_FACTS = ("cpu_capability", "cpu_vendor", "cpu_model", "machine")
FIX = """\
# strict's bits are per machine (MKL and torch pick kernels per CPU); portable's are the same on every
# x86-64 CPU with AVX. Make the lock, the results and every later run with it:
#   steadyclip lock MODEL --pretrained TAG_OR_FILE --profile portable -o steadyclip.lock
#   steadyclip batch INPUTS --profile portable ...        (classify, embed, serve take it too)
engine = steadyclip.Engine(steadyclip.load(MODEL, pretrained=TAG_OR_FILE, lock="steadyclip.lock"), profile="portable")"""


def check_cross_machine(findings: Findings, lock: str | os.PathLike[str] | Mapping[str, Any] | None) -> None:
    """Recompute a lock's probe here and name the CPU as the cause when only the CPU differs."""
    from steadyclip.engine import Engine
    from steadyclip.engine.probe import compare_probe, probe_settings
    from steadyclip.model.loading import load, source_from_lock
    from steadyclip.model.lockfile import read_lock

    if lock is None:
        findings.skipped(CHECK_ID, "no lock given: nothing made on another machine to compare with")
        return
    doc = dict(lock) if isinstance(lock, Mapping) else read_lock(lock)
    probe = doc.get("probe")
    if not probe:
        findings.skipped(CHECK_ID, "the lock has no behaviour probe (make it with `steadyclip lock`)")
        return
    source, pretrained = source_from_lock(doc)
    loaded = load(source, pretrained=pretrained, lock=None if isinstance(lock, Mapping) else lock)
    with Engine(loaded, probe_settings(probe), replicas=1) as engine:
        report = compare_probe(probe, engine)
    cpu = {k: v for k, v in report.stack_differences.items() if k in CPU_FACTS}
    if report.status == "bitwise-identical":
        findings.ok(CHECK_ID, "the lock's probe recomputes bit for bit on this machine")
        return
    if not cpu:
        findings.ok(CHECK_ID, f"the lock's probe differs ({report.status}) but not because of the CPU: "
                              f"{report.describe()}")
        return
    then = probe.get("stack", {}).get("profile", "strict")
    findings.add(Cause(
        CHECK_ID, None, "problem",
        f"results made on another CPU ({_words(cpu, 0)}) differ from this one's ({_words(cpu, 1)}): "
        f"max |diff| {report.max_abs:.3g}, min cosine {report.min_cosine:.8f} under the {then} profile, "
        "whose bits are per machine",
        {"cpu_then": {k: v[0] for k, v in cpu.items()}, "cpu_now": {k: v[1] for k, v in cpu.items()},
         "max_abs": report.max_abs, "min_cosine": report.min_cosine, "probe": report.status,
         "other_differences": {k: v for k, v in report.stack_differences.items() if k not in CPU_FACTS}},
        FIX))


def _words(cpu: Mapping[str, tuple[str, str]], side: int) -> str:
    return ", ".join(str(v[side]) for k, v in cpu.items() if k != "machine")
