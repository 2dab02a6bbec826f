"""Downloaded weights: open_clip pretrained tags and ``hf-hub:`` repos, verified on arrival.

Downloads go through open_clip's own helpers (``open_clip.pretrained``), which use
``huggingface_hub`` for hub entries and urllib for release URLs. What steadyclip
adds:

- the SHA-256 a release URL carries is checked (the full digest in OpenAI URLs,
  a prefix in ``..._e32-46683a32.pt`` release names), and for hub files the
  LFS SHA-256 the hub cache names each blob after;
- hub files are pinned to a revision (from ``@rev`` or a lockfile) and the commit
  they came from is recorded; config and weights come from the same commit;
- a cached file that fails its hash is moved aside (``.corrupt-<ts>``) and
  fetched once more; a second failure is an ``IntegrityError``, never a load.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steadyclip.errors import IntegrityError, ModelSourceError
from steadyclip.model import integrity
from steadyclip.model.sources.local import read_open_clip_config
from steadyclip.model.sources.spec import TAG_PREPROCESS_KEYS, ResolvedSource
from steadyclip.model.sources.tags import builtin_model_cfg

_logger = logging.getLogger(__name__)

__all__ = ["fetch_verified", "hub_commit", "hub_lfs_sha256", "move_aside", "parse_hub_name", "resolve_hf_hub",
           "resolve_tag", "url_sha256"]

_SNAPSHOT_RE = re.compile(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def url_sha256(url: str) -> str | None:
    """The SHA-256 (or prefix) a pretrained URL carries, as open_clip reads it; None if it carries none."""
    filename = os.path.basename(url)
    if "openaipublic" in url:
        candidate = url.split("/")[-2]
    elif "mlfoundations" in url:
        candidate = os.path.splitext(filename)[0].split("-")[-1]
    else:
        return None
    return candidate.lower() if re.fullmatch(r"[0-9a-fA-F]{8,64}", candidate) else None


def hub_commit(path: str | os.PathLike[str]) -> str | None:
    """The commit a file in the hub cache belongs to (``.../snapshots/<commit>/file``)."""
    m = _SNAPSHOT_RE.search(os.fspath(path))
    return m.group(1) if m else None


def hub_lfs_sha256(path: str | os.PathLike[str]) -> str | None:
    """The SHA-256 the hub published for an LFS file: its cache blob is named after it."""
    p = Path(path)
    if not p.is_symlink():
        return None
    blob = p.resolve().name
    return blob if _SHA256_RE.match(blob) else None


def move_aside(path: Path) -> Path:
    """Rename a file that failed its hash to ``<name>.corrupt-<timestamp>`` (kept for inspection)."""
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    _logger.warning("moved %s aside to %s after a failed hash check", path, target)
    return target


def _discard(path: Path) -> Path:
    """Move a bad cached file aside; for a hub snapshot link, the blob it points at and the link."""
    real = path.resolve()
    aside = move_aside(real)
    if path.is_symlink() or path != real:
        path.unlink(missing_ok=True)
    return aside


def fetch_verified(
    fetch: Callable[[], str | os.PathLike[str]],
    expected: Callable[[Path], list[str]],
    *,
    what: str,
) -> tuple[Path, str]:
    """Fetch a file and check it; a bad file is moved aside and fetched once more.

    Args:
        fetch: downloads (or finds in cache) the file and returns its path.
        expected: the hashes (full or prefix) the file must match, given its path.
        what: names the file in messages.
    Returns:
        (path, full SHA-256).
    Raises:
        ModelSourceError: the download itself failed.
        IntegrityError: the file failed its hash twice.
    """
    aside: Path | None = None
    for attempt in (1, 2):
        try:
            path = Path(fetch())
        except (OSError, RuntimeError, ValueError) as e:  # open_clip raises these for network/checksum failures
            raise ModelSourceError(
                f"could not fetch {what}: {e}. If offline, fetch it once while online or use a local checkpoint."
            ) from e
        digest = integrity.sha256_file(path)
        bad = [h for h in expected(path) if not integrity.sha256_matches(digest, h)]
        if not bad:
            if attempt == 2:
                _logger.warning("%s re-fetched and verified after a corrupt cached copy (%s)", what, aside)
            return path, digest
        aside = _discard(path)
        if attempt == 2:
            raise IntegrityError(
                f"{what} {path} failed its SHA-256 check twice: expected {bad[0]}, actual {digest}. "
                f"The bad copy was moved to {aside}. The source may be serving different bytes; do not use it."
            )
        _logger.warning("%s %s failed its SHA-256 check (expected %s, actual %s); fetching it again",
                        what, path, bad[0], digest)
    raise AssertionError("unreachable")


def _hub_fetcher(repo: str, filename: str | None, revision: str | None,
                 cache_dir: str | os.PathLike[str] | None) -> Callable[[], str]:
    def fetch() -> str:
        from open_clip import pretrained as ocp

        kwargs: dict[str, Any] = {"revision": revision, "cache_dir": os.fspath(cache_dir) if cache_dir else None}
        if filename:
            kwargs["filename"] = filename
        return str(ocp.download_pretrained_from_hf(repo, **kwargs))

    return fetch


def _hub_expected(revision: str | None, lock_sha: str | None) -> Callable[[Path], list[str]]:
    def expected(path: Path) -> list[str]:
        out = [h for h in (lock_sha, hub_lfs_sha256(path)) if h]
        commit = hub_commit(path)
        if revision and _COMMIT_RE.match(revision) and commit and commit != revision:
            raise IntegrityError(
                f"hub file {path} is from commit {commit}, but revision {revision} was pinned; "
                "clear that file from the hub cache and load again"
            )
        return out

    return expected


def resolve_tag(
    arch: str,
    tag: str,
    tag_cfg: dict[str, Any],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    expected_sha256: str | None = None,
) -> ResolvedSource:
    """Fetch and verify the weights of an open_clip pretrained tag."""
    from open_clip import pretrained as ocp

    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    overrides = {k: tag_cfg[k] for k in TAG_PREPROCESS_KEYS if k in tag_cfg}
    url, hf_hub = tag_cfg.get("url", ""), tag_cfg.get("hf_hub", "")
    what = f"weights of {arch}/{tag}"
    used_revision: str | None = None
    if "file" in tag_cfg:
        path = Path(tag_cfg["file"])
        digest = integrity.verify_sha256(path, expected_sha256, what=what) if expected_sha256 \
            else integrity.sha256_file(path)
    elif hf_hub and ocp.has_hf_hub():
        # open_clip's convention: "org/repo/" means the default file, "org/repo/file.bin" that file.
        repo, filename = os.path.split(hf_hub)
        path, digest = fetch_verified(_hub_fetcher(repo, filename or None, revision, cache_dir),
                                      _hub_expected(revision, expected_sha256), what=what)
        used_revision = hub_commit(path) or revision
    elif url:
        def fetch() -> str:
            target_dir = os.fspath(cache_dir) if cache_dir else None
            try:
                return str(ocp.download_pretrained_from_url(url, cache_dir=target_dir))
            except RuntimeError as e:
                if "SHA256" not in str(e):
                    raise
                # open_clip leaves a download that failed its checksum in place: hand it to our
                # check, which moves it aside and fetches once more.
                return os.path.join(target_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))

        url_hash = url_sha256(url)
        path, digest = fetch_verified(fetch, lambda _p: [h for h in (expected_sha256, url_hash) if h], what=what)
    else:
        raise ModelSourceError(f"open_clip's entry for {arch}/{tag} names no file, URL or hub repo")
    return ResolvedSource(
        model_id=arch,
        kind="tag",
        arch=arch,
        create_name=arch,
        model_cfg=builtin_model_cfg(arch, quick_gelu),
        pretrained=tag,
        revision=used_revision,
        weights_file=path,
        weights_sha256=digest,
        quick_gelu=quick_gelu,
        preprocess_overrides=overrides,
        tokenizer_name=arch,
    )


def parse_hub_name(source: str) -> tuple[str, str | None]:
    """``hf-hub:org/repo@rev`` -> (``org/repo``, ``rev``)."""
    name = source[len("hf-hub:"):]
    repo, _, rev = name.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelSourceError(f"{source!r} is not 'hf-hub:ORG/REPO' or 'hf-hub:ORG/REPO@REVISION'")
    return repo, rev or None


def resolve_hf_hub(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    expected_sha256: str | None = None,
) -> ResolvedSource:
    """Fetch config and weights of an open_clip hub repo from one commit, verified."""
    repo, name_rev = parse_hub_name(source)
    rev = name_rev or revision
    if name_rev and revision and name_rev != revision:
        # The name asks for another commit than the lock: a different file is expected, not a
        # corrupt one, so the lock's hash must not send a good download to the bin (the lock
        # comparison after loading reports the mismatch).
        expected_sha256 = None
    config_path, _ = fetch_verified(_hub_fetcher(repo, "open_clip_config.json", rev, cache_dir),
                                    _hub_expected(rev, None), what=f"config of hf-hub:{repo}")
    commit = hub_commit(config_path) or rev
    model_cfg, pp = read_open_clip_config(config_path)
    # Weights from the very commit the config came from, so the two always match.
    wpath, digest = fetch_verified(_hub_fetcher(repo, None, commit, cache_dir),
                                   _hub_expected(commit, expected_sha256), what=f"weights of hf-hub:{repo}")
    folder = config_path.parent
    text_cfg = model_cfg.get("text_cfg", {})
    return ResolvedSource(
        model_id=f"hf-hub:{repo}",
        kind="hf-hub",
        arch=f"hf-hub:{repo}",
        # Build from the downloaded config (open_clip's local-dir path, weights not loaded by it).
        create_name=f"local-dir:{folder}",
        model_cfg=model_cfg,
        pretrained=None,
        revision=hub_commit(wpath) or commit,
        weights_file=wpath,
        weights_sha256=digest,
        preprocess_overrides=pp,
        tokenizer_name=f"hf-hub:{repo}" if text_cfg.get("hf_tokenizer_name") else f"local-dir:{folder}",
    )
