"""Proof at start-up that a portable engine computes the golden bits on this CPU.

A portable engine computes the behaviour probe (:mod:`steadyclip.engine.probe_inputs`) at the
golden's own settings and compares the SHA-256 of its image and text rows with golden digests
made on another machine: the demo model's ship with the package (``demo/portable-golden.json``,
one entry per software stack), any other model's come from its lock (``steadyclip lock
--profile portable`` stores the probe). Same stack and other digests: the engine refuses
(:class:`~steadyclip.errors.PortableProofError`), naming the CPUs of both runs. No golden for
this stack: the proof says so (``"unproven"``) in provenance; it never claims what it did not check.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from steadyclip._util.digest import sha256_array
from steadyclip.engine._core import ForwardCore
from steadyclip.engine.probe_inputs import PROBE_TEXTS, probe_images
from steadyclip.engine.settings import EngineSettings
from steadyclip.errors import PortableProofError
from steadyclip.model.loading import LoadedModel
from steadyclip.numerics import identity
from steadyclip.numerics.cpuid import cpu_facts

__all__ = ["GOLDEN_FILE", "golden_entry", "golden_record", "probe_digests", "prove", "stack_key"]

GOLDEN_FILE = Path(__file__).resolve().parents[1] / "demo" / "portable-golden.json"
_STACK_PARTS = ("torch", "open_clip_torch", "numpy", "pillow", "timm")


def stack_key(core: ForwardCore) -> dict[str, str]:
    """The software that decides portable bits: library versions and the pinned BLAS (never the CPU)."""
    stack = identity.software_stack()
    blas = core.flags().get("pinned_kernels") or {}
    libs = blas.get("libraries") or [{}]
    return {**{k: stack.get(k, "?") for k in _STACK_PARTS}, "machine": platform.machine(),
            "blas": f"{libs[0].get('internal_api')} {libs[0].get('version')} {libs[0].get('architecture')}"}


def probe_digests(loaded: LoadedModel, settings: EngineSettings) -> dict[str, str]:
    """SHA-256 of the probe's image and text rows computed at ``settings`` in this process (one thread)."""
    core = ForwardCore(loaded, settings.replace(threads=1, replicas=1))
    images = torch.stack([core.preprocess(im) for im in probe_images(loaded.info.preprocess.size)])
    tokens = loaded.tokenizer(list(PROBE_TEXTS))
    return {"images": sha256_array(core.embed_local("image", images)),
            "texts": sha256_array(core.embed_local("text", tokens))}


def golden_entry(core: ForwardCore) -> dict[str, Any] | None:
    """The golden for this model and stack: from the model's lock, else the package's file, else ``None``."""
    stack = stack_key(core)
    locked = getattr(core.loaded, "locked_probe", None)
    if locked and locked.get("settings", {}).get("profile") == "portable":
        return {"source": "lock", "stack": locked.get("portable_stack", {}), "settings": locked["settings"],
                "images": locked["images"]["sha256"], "texts": locked["texts"]["sha256"],
                "cpu": locked.get("cpu", {})}
    if not GOLDEN_FILE.is_file():
        return None
    doc = json.loads(GOLDEN_FILE.read_text())
    if doc.get("weights_sha256") != core.loaded.info.weights_sha256:
        return None
    for entry in doc.get("entries", []):
        if entry.get("stack") == stack:
            return {"source": f"package ({GOLDEN_FILE.name})", **entry}
    return None


def prove(core: ForwardCore) -> dict[str, Any]:
    """Check this CPU's probe rows against the golden; the record that goes into provenance.

    Raises:
        PortableProofError: same software stack, other bits.
    """
    golden = golden_entry(core)
    if golden is None:
        return {"status": "unproven", "why": "no golden digests for this model and software stack "
                                             "(make them with `steadyclip lock --profile portable`)"}
    if golden.get("stack") and golden["stack"] != stack_key(core):
        return {"status": "unproven", "why": f"the golden from {golden['source']} was made with another software "
                                             f"stack: {_differences(golden['stack'], stack_key(core))}"}
    got = probe_digests(core.loaded, EngineSettings.from_dict(golden["settings"]))
    now = cpu_facts()
    wrong = [part for part in ("images", "texts") if got[part] != golden[part]]
    if wrong:
        raise PortableProofError(
            f"portable probe rows differ from the golden digests ({golden['source']}) in {', '.join(wrong)}: "
            + "; ".join(f"{p} {got[p][:16]} here, {golden[p][:16]} golden" for p in wrong)
            + f". This CPU: {_cpu_words(now)}; golden made on: {_cpu_words(golden.get('cpu', {}))}. "
            "Same software stack, other bits: this CPU or build runs a kernel the portable profile did not pin; "
            "use the strict profile here and report it")
    return {"status": "proven", "golden": golden["source"], "digests": got, "golden_cpu": golden.get("cpu", {})}


def _differences(a: dict[str, str], b: dict[str, str]) -> str:
    return ", ".join(f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _cpu_words(facts: dict[str, Any]) -> str:
    return f"{facts.get('cpu_vendor') or '?'} {facts.get('cpu_model') or '?'} ({facts.get('features') or '?'})"


def golden_record(core: ForwardCore, settings: EngineSettings) -> dict[str, Any]:
    """A golden entry for this model, stack and CPU (what ``demo/portable-golden.json`` holds)."""
    return {"stack": stack_key(core), "settings": settings.to_dict(), **probe_digests(core.loaded, settings),
            "cpu": cpu_facts()}

