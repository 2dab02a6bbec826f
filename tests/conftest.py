"""Shared test fixtures: isolated caches for every test, lazily built real checkpoints.

Fixtures others can reuse:

- ``random_checkpoints``: session-scoped, ``random_checkpoints["ViT-B-32"]`` -> path of a
  ``.safetensors`` of that open_clip architecture, random init with ``torch.manual_seed(0)``.
  Built on first use only (ViT-B-32 is ~600 MB and takes seconds), once per session.
  ``random_checkpoints.pt("RN50")`` gives the same weights as a ``torch.save`` ``.pt``.
- ``arch_checkpoint``: the same as a function, ``arch_checkpoint("RN50")``.
- ``demo_arch_checkpoint``: a random-init checkpoint of the tiny demo architecture
  (``steadyclip-shapes``, 1.8M params): the fast choice when any architecture will do.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own cache dirs; nothing touches the user's caches or the network."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("STEADYCLIP_CACHE_DIR", str(root / "steadyclip"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield root


class CheckpointFactory:
    """Lazily creates and caches random-init open_clip checkpoints for a test session."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._state: dict[str, dict[str, torch.Tensor]] = {}

    def state_dict(self, arch: str) -> dict[str, torch.Tensor]:
        if arch not in self._state:
            import open_clip

            if arch == "steadyclip-shapes":
                from steadyclip.model.registry import register_demo_config

                register_demo_config()
            torch.manual_seed(0)
            model = open_clip.create_model(arch)
            # Clone so tied weights do not share storage (safetensors stores each tensor once).
            self._state[arch] = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        return self._state[arch]

    def __getitem__(self, arch: str) -> Path:
        path = self.folder / f"{arch}.safetensors"
        if not path.exists():
            from safetensors.torch import save_file

            tmp = path.with_suffix(".partial")
            save_file(self.state_dict(arch), str(tmp))
            tmp.rename(path)
        return path

    def pt(self, arch: str) -> Path:
        path = self.folder / f"{arch}.pt"
        if not path.exists():
            tmp = path.with_suffix(".partial")
            torch.save(self.state_dict(arch), tmp)
            tmp.rename(path)
        return path

    def __contains__(self, arch: object) -> bool:
        return isinstance(arch, str) and (self.folder / f"{arch}.safetensors").exists()


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def arch_checkpoint(random_checkpoints: CheckpointFactory) -> Callable[[str], Path]:
    return random_checkpoints.__getitem__


@pytest.fixture(scope="session")
def demo_arch_checkpoint(random_checkpoints: CheckpointFactory) -> Path:
    return random_checkpoints["steadyclip-shapes"]


def copy_file(src: Path, dst: Path) -> Path:
    """Copy bytes to a fresh file (new inode/mtime), so a test can corrupt its own copy."""
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.fixture
def demo_copy(demo_arch_checkpoint: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the demo-architecture checkpoint."""
    return copy_file(demo_arch_checkpoint, tmp_path / "weights.safetensors")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

