"""Downloaded weights, tested against a local fake hub and fake release URLs (never the network)."""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest
from open_clip import pretrained as ocp

from steadyclip.errors import (
    InputError,
    IntegrityError,
    LockMismatchError,
    ModelSourceError,
)
from steadyclip.model import registry
from steadyclip.model.loading import load
from steadyclip.model.lockfile import write_lock
from steadyclip.model.sources.hub import fetch_verified, hub_commit, url_sha256

DEMO_ARCH = registry.DEMO_ARCH


class FakeHub:
    """Serves repos from memory into a real-looking hub cache (blobs named by SHA-256, snapshot links)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.repos: dict[str, list[tuple[str, dict[str, bytes | Path]]]] = {}  # repo -> [(commit, files)], newest last
        self.downloads: list[tuple[str, str, str]] = []
        self.serve_corrupt = False

    def publish(self, repo: str, files: dict[str, bytes | Path]) -> str:
        """Add a commit; a file given as a Path is served by hard link (big files, never corrupted)."""
        commit = hashlib.sha1(repr((repo, len(self.repos.get(repo, [])), sorted(files))).encode()).hexdigest()
        self.repos.setdefault(repo, []).append((commit, files))
        return commit

    def hf_hub_download(self, repo_id: str, filename: str, revision: str | None = None,
                        cache_dir: str | None = None, **_: Any) -> str:
        versions = self.repos.get(repo_id)
        if not versions:
            raise FileNotFoundError(f"404 repo {repo_id}")
        if revision in (None, "main"):
            commit, files = versions[-1]
        else:
            matches = [v for v in versions if v[0] == revision]
            if not matches:
                raise FileNotFoundError(f"404 revision {revision}")
            commit, files = matches[0]
        if filename not in files:
            raise FileNotFoundError(f"404 {repo_id}/{filename}")
        root = Path(cache_dir) if cache_dir else self.cache
        repo_dir = root / ("models--" + repo_id.replace("/", "--"))
        pointer = repo_dir / "snapshots" / commit / filename
        if pointer.exists():  # like the real hub client: a cached file is trusted as is
            return str(pointer)
        data = files[filename]
        if isinstance(data, Path):
            from steadyclip.model.integrity import sha256_file

            blob = repo_dir / "blobs" / sha256_file(data, cache=None)
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.link(data, blob)
        else:
            blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            served = bytearray(data)
            if self.serve_corrupt:
                served[len(served) // 2] ^= 0x01
            blob.write_bytes(bytes(served))
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        self.downloads.append((repo_id, filename, commit))
        return str(pointer)


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    hub = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(ocp, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(ocp, "_has_hf_hub", True)
    yield hub


def _open_clip_config(arch: str) -> bytes:
    import open_clip

    registry.register_demo_config()
    return json.dumps({"model_cfg": open_clip.get_model_config(arch),
                       "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                          "interpolation": "bilinear", "resize_mode": "squash"}}).encode()


@pytest.fixture
def demo_tag(monkeypatch: pytest.MonkeyPatch, fake_hub: FakeHub, demo_arch_checkpoint: Path) -> str:
    """An open_clip pretrained tag for the demo architecture that lives on the fake hub."""
    registry.register_demo_config()
    fake_hub.publish("fake/shapes", {"open_clip_model.safetensors": demo_arch_checkpoint.read_bytes()})
    monkeypatch.setitem(ocp._PRETRAINED, DEMO_ARCH,
                        {"fakehub": ocp._pcfg(hf_hub="fake/shapes/", quick_gelu=True, mean=(0.1, 0.2, 0.3))})
    return "fakehub"


def test_tag_via_hub_records_revision_and_tag_preprocessing(demo_tag: str, fake_hub: FakeHub) -> None:
    m = load(DEMO_ARCH, pretrained=demo_tag)
    commit = fake_hub.repos["fake/shapes"][-1][0]
    assert m.info.source == "tag" and m.info.pretrained == demo_tag
    assert m.info.revision == commit
    assert m.info.preprocess.mean == (0.1, 0.2, 0.3)  # the tag's, not the architecture default
    served = fake_hub.repos["fake/shapes"][-1][1]["open_clip_model.safetensors"]
    assert isinstance(served, bytes) and m.info.weights_sha256 == hashlib.sha256(served).hexdigest()
    again = load(DEMO_ARCH, pretrained=demo_tag)
    assert again.info.fingerprint == m.info.fingerprint
    assert len(fake_hub.downloads) == 1  # second load served from cache


def test_tag_quick_gelu_changes_the_config_hash(demo_tag: str, demo_arch_checkpoint: Path) -> None:
    via_tag = load(DEMO_ARCH, pretrained=demo_tag)
    via_file = load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    assert via_tag.info.fingerprint == via_file.info.fingerprint  # same tensors
    assert via_tag.info.config_hash != via_file.info.config_hash  # but QuickGELU, as the tag requires


def test_corrupt_cached_download_is_moved_aside_and_refetched(demo_tag: str, fake_hub: FakeHub) -> None:
    first = load(DEMO_ARCH, pretrained=demo_tag)
    blob = Path(first.info.weights_files[0]).resolve()
    data = bytearray(blob.read_bytes())
    data[12345] ^= 0x10
    blob.write_bytes(bytes(data))
    second = load(DEMO_ARCH, pretrained=demo_tag)
    assert second.info.fingerprint == first.info.fingerprint
    assert len(fake_hub.downloads) == 2
    assert [p.name for p in blob.parent.iterdir() if ".corrupt-" in p.name]


def test_corrupt_twice_is_integrity_error_never_a_load(demo_tag: str, fake_hub: FakeHub) -> None:
    fake_hub.serve_corrupt = True
    with pytest.raises(IntegrityError, match="failed its SHA-256 check twice") as e:
        load(DEMO_ARCH, pretrained=demo_tag)
    assert "expected" in str(e.value) and "actual" in str(e.value)
    assert len(fake_hub.downloads) == 2


def test_a_malformed_expected_hash_is_input_error_and_the_file_stays(tmp_path: Path) -> None:
    """One rule for expected hashes: a bad one is the user's to fix, not a corrupt file to move aside."""
    good = tmp_path / "weights.bin"
    good.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert fetch_verified(lambda: good, lambda _p: [digest[:8].upper()], what="w") == (good, digest)
    with pytest.raises(InputError, match="8 to 64 hex digits"):
        fetch_verified(lambda: good, lambda _p: [digest[:8] + "zz"], what="w")
    assert good.exists() and [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_a_lock_with_a_malformed_hash_is_refused_before_any_download(
        demo_tag: str, fake_hub: FakeHub, tmp_path: Path) -> None:
    lock = tmp_path / "steadyclip.lock"
    write_lock(lock, load(DEMO_ARCH, pretrained=demo_tag).info)
    doc = json.loads(lock.read_text())
    doc["model"]["weights_sha256"] = "not-a-hash"
    lock.write_text(json.dumps(doc))
    fake_hub.serve_corrupt = True  # the old rule moved the cached file aside and fetched it again
    with pytest.raises(InputError, match="8 to 64 hex digits"):
        load(DEMO_ARCH, pretrained=demo_tag, lock=lock)
    assert len(fake_hub.downloads) == 1  # the first load's only


def test_hf_hub_source_pins_revision(fake_hub: FakeHub, demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    cfg = _open_clip_config(DEMO_ARCH)
    old = fake_hub.publish("org/shapes", {"open_clip_config.json": cfg,
                                          "open_clip_model.safetensors": demo_arch_checkpoint.read_bytes()})
    sd = load_file(str(demo_arch_checkpoint))
    sd["logit_scale"] = sd["logit_scale"] + 1
    changed = tmp_path / "new.safetensors"
    save_file(sd, str(changed))
    new = fake_hub.publish("org/shapes", {"open_clip_config.json": cfg,
                                          "open_clip_model.safetensors": changed.read_bytes()})

    latest = load("hf-hub:org/shapes")
    pinned = load(f"hf-hub:org/shapes@{old}")
    assert latest.info.revision == new and pinned.info.revision == old
    assert latest.info.fingerprint != pinned.info.fingerprint
    assert pinned.info.preprocess.resize_mode == "squash"  # from the repo's open_clip_config.json
    assert pinned.info.source == "hf-hub"

    lock = tmp_path / "steadyclip.lock"
    write_lock(lock, pinned.info)
    relocked = load("hf-hub:org/shapes", lock=lock)  # the lock pins the old commit, though main moved on
    assert relocked.info.revision == old and relocked.info.fingerprint == pinned.info.fingerprint
    with pytest.raises(LockMismatchError) as e:
        load(f"hf-hub:org/shapes@{new}", lock=lock)
    assert e.value.field in ("weights_sha256", "revision")


def test_hf_hub_unknown_repo_and_bad_name(fake_hub: FakeHub) -> None:
    with pytest.raises(ModelSourceError, match="could not fetch"):
        load("hf-hub:org/nothing-here")
    with pytest.raises(ModelSourceError, match="not 'hf-hub:ORG/REPO'"):
        load("hf-hub:no-slash")


def test_local_dir_source(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_bytes(_open_clip_config(DEMO_ARCH))
    (folder / "open_clip_model.safetensors").write_bytes(demo_arch_checkpoint.read_bytes())
    m = load(f"local-dir:{folder}")
    assert m.info.source == "local-dir" and m.info.preprocess.interpolation == "bilinear"
    assert m.info.fingerprint == load(DEMO_ARCH, pretrained=demo_arch_checkpoint).info.fingerprint
    (folder / "other.pt").write_bytes(b"x")
    (folder / "open_clip_model.safetensors").rename(folder / "b.safetensors")
    with pytest.raises(ModelSourceError, match="will not guess"):
        load(f"local-dir:{folder}")


# --- release URLs carrying a hash --------------------------------------------------------

def test_url_sha256_reads_what_open_clip_urls_carry() -> None:
    assert url_sha256(ocp.get_pretrained_url("ViT-B-32", "openai")) == (
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af")
    assert url_sha256(ocp.get_pretrained_url("ViT-B-32", "laion400m_e32")) == "46683a32"
    assert url_sha256("https://example.com/model.pt") is None
    assert hub_commit("/c/models--a--b/snapshots/" + "a" * 40 + "/f.bin") == "a" * 40


class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def url_tag(monkeypatch: pytest.MonkeyPatch, demo_arch_checkpoint: Path, tmp_path: Path) -> dict[str, Any]:
    """A release-URL tag (hash prefix in the name) served by a fake urlopen through open_clip's own downloader."""
    registry.register_demo_config()
    data = demo_arch_checkpoint.read_bytes()
    prefix = hashlib.sha256(data).hexdigest()[:8]
    url = f"https://github.com/mlfoundations/open_clip/releases/download/v0/shapes-{prefix}.safetensors"
    state: dict[str, Any] = {"data": data, "requests": 0, "corrupt": False, "cache": tmp_path / "clip-cache"}

    def urlopen(u: str) -> _FakeResponse:
        assert u == url
        state["requests"] += 1
        body = bytearray(state["data"])
        if state["corrupt"]:
            body[100] ^= 0x01
        return _FakeResponse(bytes(body))

    monkeypatch.setattr(ocp.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(ocp, "tqdm", lambda **kw: _NoBar())
    monkeypatch.setattr(ocp, "_has_hf_hub", False)
    monkeypatch.setitem(ocp._PRETRAINED, DEMO_ARCH, {"release": ocp._pcfg(url=url)})
    return state


class _NoBar:
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def test_release_url_hash_is_checked(url_tag: dict[str, Any]) -> None:
    m = load(DEMO_ARCH, pretrained="release", cache_dir=url_tag["cache"])
    assert m.info.revision is None and m.info.source == "tag"
    assert url_tag["requests"] == 1
    load(DEMO_ARCH, pretrained="release", cache_dir=url_tag["cache"])
    assert url_tag["requests"] == 1  # cached and still matching


def test_release_url_serving_wrong_bytes_is_integrity_error(url_tag: dict[str, Any]) -> None:
    url_tag["corrupt"] = True
    with pytest.raises(IntegrityError, match="twice"):
        load(DEMO_ARCH, pretrained="release", cache_dir=url_tag["cache"])
    assert url_tag["requests"] == 2
    assert not [p for p in url_tag["cache"].iterdir() if p.suffix == ".safetensors"]  # nothing bad left to load


@pytest.mark.slow
def test_real_builtin_tag_through_fake_hub(fake_hub: FakeHub, arch_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """RN50/openai: open_clip's own table entry (hub repo, QuickGELU, OpenAI preprocessing)."""
    repo = ocp.get_pretrained_cfg("RN50", "openai")["hf_hub"].rstrip("/")
    fake_hub.publish(repo, {"open_clip_model.safetensors": arch_checkpoint("RN50")})
    m = load("RN50", pretrained="openai")
    assert m.info.revision == fake_hub.repos[repo][-1][0]
    assert m.info.preprocess.interpolation == "bicubic"
    assert type(m.model.get_submodule("visual.layer1.0.act1")).__name__ == "ReLU"  # RN50 convs unchanged
    assert "QuickGELU" in {type(x).__name__ for x in m.model.modules()}
