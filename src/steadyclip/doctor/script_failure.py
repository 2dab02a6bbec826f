"""When the user's script crashes: which file it was loading, what that file should have been, how to fix it.

A traceback names an exception (``SafetensorError: incomplete metadata``,
``FileNotFoundError: Failed to download file``); the observer's records of the
``create_model*`` call, the download it asked for and the file it opened name
the thing to repair. Without such a record the traceback is all there is, and
no cause is guessed.
"""
from __future__ import annotations

from typing import Any

from steadyclip.doctor.result import Cause
from steadyclip.doctor.script_trace import RunTrace, Where
from steadyclip.doctor.script_weights import located

__all__ = ["diagnose_failure"]

FIX_UNREADABLE = """\
# the weights file is truncated or damaged: delete it (in a Hugging Face cache, the blob it links to as well)
#   rm FILES
# and fetch it again (run once online, without HF_HUB_OFFLINE=1), then pin its hash so a bad copy is refused:
#   steadyclip lock LOCK_ARGS -o steadyclip.lock
model = steadyclip.load(LOAD_ARGS, lock="steadyclip.lock")   # checks size and SHA-256"""

FIX_MISSING = """\
# the weights were never downloaded into this cache (HF_HOME=HFHOME, HF_HUB_OFFLINE=OFFLINE): fetch them once,
# online, into the same cache:
#   huggingface-cli download REPO FILE
# (or run your script once without HF_HUB_OFFLINE=1), then pin them:
#   steadyclip lock LOCK_ARGS -o steadyclip.lock"""


def _model_attempt(trace: RunTrace) -> dict[str, Any]:
    """The create_model* call that failed (or the last one made)."""
    failed = [f for f in trace.failures if f.get("event") == "create_failed"]
    if failed:
        return failed[-1]
    if trace.models:
        rec = trace.models[max(trace.models)]
        return {"arch": rec.arch, "pretrained": rec.pretrained, "where": rec.where.to_dict() if rec.where else None}
    return {}


def _unreadable(f: dict[str, Any], attempt: dict[str, Any]) -> Cause:
    err = f.get("error") or {}
    size, sha, expected = f.get("size"), f.get("sha256"), f.get("expected_sha256")
    what = f"{f.get('path')} ({size} bytes, SHA-256 {str(sha)[:16]}...)" if f.get("exists") else \
        f"{f.get('path')} (it does not exist)"
    summary = f"the script crashed reading the weights file {what}: {err.get('type')}: {err.get('message')}"
    if expected and sha and expected != sha:
        summary += (f"; the Hugging Face cache stored it as the blob with SHA-256 {expected[:16]}..., its bytes now "
                    "hash to something else: the file is truncated or damaged")
    elif f.get("exists"):
        summary += "; a file that does not parse is truncated or damaged"
    files = " ".join(str(x) for x in (f.get("path"), f.get("blob")) if x)
    arch, pretrained = attempt.get("arch"), attempt.get("pretrained")
    fix = FIX_UNREADABLE.replace("FILES", files).replace("LOCK_ARGS", _lock_args(arch, pretrained)) \
        .replace("LOAD_ARGS", _load_args(arch, pretrained))
    evidence = {"file": f.get("path"), "size": size, "sha256": sha, "expected_sha256": expected,
                "error": err, "via": f.get("via"), "arch": arch, "pretrained": pretrained}
    where = Where.of(attempt.get("where") or f.get("where"))
    return Cause("weights_unreadable", None, "problem", summary, evidence,
                 located(fix, where, "the weights are read here"))


def _hub(arch: Any) -> bool:
    return isinstance(arch, str) and arch.startswith(("hf-hub:", "local-dir:"))


def _lock_args(arch: Any, pretrained: Any) -> str:
    """``steadyclip lock``'s arguments for this model (a hub name carries its own weights: no --pretrained)."""
    name = str(arch) if arch else "ARCH"
    if _hub(arch):
        return name
    return f"{name} --pretrained {pretrained if pretrained else 'TAG_OR_FILE'}"


def _load_args(arch: Any, pretrained: Any) -> str:
    if _hub(arch):
        return repr(arch)
    return f"{arch!r}, pretrained={pretrained!r}" if arch and pretrained else "ARCH, pretrained=TAG_OR_FILE"


def _missing(d: dict[str, Any], attempt: dict[str, Any]) -> Cause:
    err = d.get("error") or {}
    repo, file = d.get("source"), d.get("filename") or "open_clip_model.safetensors"
    arch, pretrained = attempt.get("arch"), attempt.get("pretrained")
    summary = (f"open_clip needed the weights {file} of {repo} for ({arch!r}, pretrained={pretrained!r}) and they "
               f"are not in the cache (HF_HOME={d.get('hf_home')}, HF_HUB_OFFLINE={d.get('offline')}): "
               f"{err.get('type')}: {str(err.get('message'))[:300]}")
    fix = (FIX_MISSING.replace("HFHOME", str(d.get("hf_home"))).replace("OFFLINE", str(d.get("offline")))
           .replace("REPO", str(repo)).replace("FILE", str(file)).replace("LOCK_ARGS", _lock_args(arch, pretrained)))
    evidence = {"repo": repo, "filename": file, "hf_home": d.get("hf_home"), "offline": d.get("offline"),
                "error": err, "arch": arch, "pretrained": pretrained}
    return Cause("weights_missing", None, "problem", summary, evidence,
                 located(fix, Where.of(attempt.get("where")), "the model whose weights are missing"))


def diagnose_failure(trace: RunTrace) -> tuple[Cause, ...]:
    """The cause of a crash while loading weights, from the observer's records; () when none explains it."""
    attempt = _model_attempt(trace)
    bad_file = next((f for f in reversed(trace.failures) if f.get("event") in ("weights_failed", "file_failed")),
                    None)
    if bad_file is not None:
        return (_unreadable(bad_file, attempt),)
    missing = [d for d in trace.downloads if not d.get("ok") and not str(d.get("filename") or "").endswith(".json")]
    if missing and attempt.get("error"):
        return (_missing(missing[-1], attempt),)
    return ()
