"""``import steadyclip``: a pinned ``__all__``, lazily imported names, and their types for type checkers."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import steadyclip

PUBLIC = [
    "Classification", "ClassifyReport", "EmbedReport", "Engine", "EngineSettings", "ExecutionRecord", "ImageFailure",
    "LoadedModel", "ModelInfo", "Profile", "Provenance", "TextCache", "VerifyReport", "__version__",
    "diagnose", "errors", "get_profile", "get_template_set", "load", "load_image", "verify_results",
]


def test_all_is_pinned_and_every_public_name_is_lazy() -> None:
    assert sorted(steadyclip.__all__) == sorted(PUBLIC)
    assert set(steadyclip._LAZY) == set(PUBLIC) - {"__version__"}


def test_every_lazy_name_is_the_object_its_module_defines() -> None:
    for name, module in steadyclip._LAZY.items():
        mod = importlib.import_module(module)
        assert getattr(steadyclip, name) is (mod if name == "errors" else getattr(mod, name)), name


def test_the_type_checking_imports_name_exactly_the_lazy_objects() -> None:
    """mypy sees ``steadyclip.Engine`` etc. through the ``if TYPE_CHECKING:`` block: it must match ``_LAZY``."""
    tree = ast.parse(Path(steadyclip.__file__).read_text(encoding="utf-8"))
    blocks = [n for n in tree.body if isinstance(n, ast.If) and isinstance(n.test, ast.Name)
              and n.test.id == "TYPE_CHECKING"]
    assert len(blocks) == 1
    typed: dict[str, str] = {}
    for node in blocks[0].body:
        assert isinstance(node, ast.ImportFrom) and node.module is not None
        for alias in node.names:
            assert alias.asname is None
            is_module = node.module == "steadyclip"  # `from steadyclip import errors`: the module itself
            typed[alias.name] = f"steadyclip.{alias.name}" if is_module else node.module
    assert typed == steadyclip._LAZY


def test_import_steadyclip_imports_neither_torch_nor_numpy() -> None:
    code = "import sys, steadyclip; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
