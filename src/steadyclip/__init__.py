"""steadyclip: OpenCLIP inference that gives the same answer every time.

    >>> import steadyclip
    >>> engine = steadyclip.Engine(steadyclip.load())          # bundled demo model, hash-verified
    >>> res = engine.classify(["examples/red_circle.png"], ["red circle", "blue square"])[0]
    >>> res.label, res.provenance.fingerprint[:12]

Public names are imported lazily so that ``import steadyclip`` (and the CLI's
``--help``) do not pay for importing torch. The ``TYPE_CHECKING`` block names the same
objects for type checkers (it never runs); a test keeps it and ``_LAZY`` in step.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steadyclip import errors
    from steadyclip.doctor import diagnose
    from steadyclip.engine import Engine
    from steadyclip.engine.images import load_image
    from steadyclip.engine.layout import ExecutionRecord
    from steadyclip.engine.prompts import get_template_set
    from steadyclip.engine.settings import EngineSettings
    from steadyclip.engine.textcache import TextCache
    from steadyclip.model.loading import LoadedModel, ModelInfo, load
    from steadyclip.numerics.determinism import get_profile
    from steadyclip.numerics.profiles import Profile
    from steadyclip.results import (
        Classification,
        ClassifyReport,
        EmbedReport,
        ImageFailure,
        Provenance,
    )
    from steadyclip.verify import VerifyReport, verify_results

__version__ = "0.1.0"

# MKL's reproducibility mode must be chosen before the process's first GEMM.
from steadyclip.numerics.early import early_init as _early_init

_early_init()

_LAZY: dict[str, str] = {
    "load": "steadyclip.model.loading",
    "LoadedModel": "steadyclip.model.loading",
    "ModelInfo": "steadyclip.model.loading",
    "Engine": "steadyclip.engine",
    "EngineSettings": "steadyclip.engine.settings",
    "ExecutionRecord": "steadyclip.engine.layout",
    "Profile": "steadyclip.numerics.profiles",
    "Classification": "steadyclip.results",
    "ClassifyReport": "steadyclip.results",
    "EmbedReport": "steadyclip.results",
    "ImageFailure": "steadyclip.results",
    "Provenance": "steadyclip.results",
    "TextCache": "steadyclip.engine.textcache",
    "get_template_set": "steadyclip.engine.prompts",
    "load_image": "steadyclip.engine.images",
    "get_profile": "steadyclip.numerics.determinism",
    "diagnose": "steadyclip.doctor",
    "errors": "steadyclip.errors",
    "VerifyReport": "steadyclip.verify",
    "verify_results": "steadyclip.verify",
}

__all__ = [
    "Classification", "ClassifyReport", "EmbedReport", "Engine", "EngineSettings", "ExecutionRecord", "ImageFailure",
    "LoadedModel", "ModelInfo", "Profile", "Provenance", "TextCache", "VerifyReport", "__version__",
    "diagnose", "errors", "get_profile", "get_template_set", "load", "load_image", "verify_results",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'steadyclip' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name == "errors" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
