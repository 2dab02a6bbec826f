"""Add this software stack's golden portable digests of the demo model to ``demo/portable-golden.json``.

    ATEN_CPU_CAPABILITY=default OPENBLAS_CORETYPE=SandyBridge MKL_CBWR=COMPATIBLE \\
        python -m steadyclip.demo.make_portable_golden

Run it on any x86-64 machine after a dependency upgrade (torch, open_clip, numpy, Pillow); the
entry for another stack is kept. The entry records the CPU it was made on: every portable engine
on another CPU with this stack then proves its rows against it (:mod:`steadyclip.engine.portable_proof`).
"""
from __future__ import annotations

import json
import logging

from steadyclip._util.atomic import write_atomic
from steadyclip.engine._core import ForwardCore
from steadyclip.engine.portable_proof import GOLDEN_FILE, golden_record
from steadyclip.engine.settings import EngineSettings
from steadyclip.model.loading import load

_logger = logging.getLogger("steadyclip.demo.make_portable_golden")


def main() -> None:
    loaded = load()
    settings = EngineSettings(profile="portable")
    entry = golden_record(ForwardCore(loaded, settings), settings)
    doc = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.is_file() else {}
    if doc.get("weights_sha256") not in (None, loaded.info.weights_sha256):
        doc = {}  # the demo weights changed: older goldens describe other weights
    kept = [e for e in doc.get("entries", []) if e.get("stack") != entry["stack"]]
    doc = {"model_id": loaded.info.model_id, "weights_sha256": loaded.info.weights_sha256,
           "entries": [*kept, entry]}
    write_atomic(GOLDEN_FILE, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    _logger.warning("wrote %s: images %s, texts %s (%s)", GOLDEN_FILE, entry["images"][:16], entry["texts"][:16],
                    entry["cpu"].get("cpu_model"))


if __name__ == "__main__":
    main()
