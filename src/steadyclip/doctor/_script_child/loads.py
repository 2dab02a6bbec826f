"""Where the script's weights came from, and what went wrong on the way: downloads, files, config/tag checks.

Loaded by ``observer`` (by file path) once the script has imported open_clip.
The parent needs these records most when the script crashes while loading (a
truncated file, a file never downloaded): the traceback names an exception, the
records name the file, its size and hash, and the one it should have been.
Nothing here changes what open_clip does, except the ``config`` fix, which
builds the model with the activation its pretrained tag was trained with.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steadyclip.doctor._script_child.observer import Observer

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
QUICKGELU_SUFFIX = "-quickgelu"


def sha256_of(path: str) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def describe_file(path: str | None) -> dict[str, Any]:
    """Size, SHA-256 and - in a Hugging Face cache - the SHA-256 the hub named the blob by (LFS files)."""
    if not path:
        return {"path": None}
    out: dict[str, Any] = {"path": os.path.abspath(path), "exists": os.path.exists(path)}
    if not out["exists"]:
        return out
    out["size"] = os.path.getsize(path)
    out["sha256"] = sha256_of(path)
    real = os.path.realpath(path)
    blob = os.path.basename(real)
    if real != os.path.abspath(path) and os.path.basename(os.path.dirname(real)) == "blobs" and _HEX64.match(blob):
        out["expected_sha256"] = blob  # huggingface_hub stores an LFS file under its SHA-256
        out["blob"] = real
    return out


def error_of(e: BaseException) -> dict[str, str]:
    return {"type": type(e).__name__, "module": type(e).__module__, "message": str(e)[:2000]}


@contextlib.contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """open_clip's warnings (``warnings.warn`` and ``logging.warning``) while a factory runs; they still show."""
    caught: list[str] = []
    shown = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        caught.append(f"{getattr(category, '__name__', 'Warning')}: {message}")
        if shown is getattr(warnings, "_showwarning_orig", None):
            # what warnings does when nobody hooked it: a script's own catch_warnings(record=True) still records it
            msg = warnings.WarningMessage(message, category, filename, lineno, file, line)
            warnings._showwarnmsg_impl(msg)  # type: ignore[attr-defined]
        else:
            shown(message, category, filename, lineno, file, line)

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            caught.append(f"{record.levelname}: {record.getMessage()}")
        return True  # a filter on the logger, not a handler: what the user sees is unchanged

    root = logging.getLogger()
    warnings.showwarning = show
    root.addFilter(keep)
    try:
        yield caught
    finally:
        warnings.showwarning = shown
        root.removeFilter(keep)


def quick_gelu(arch: Any, pretrained: Any, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The activation the model will be built with against the one its pretrained tag was trained with."""
    if not isinstance(arch, str) or not isinstance(pretrained, str) or arch.startswith(("hf-hub:", "local-dir:")):
        return None
    import open_clip

    name = arch.replace("/", "-")
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    model_cfg = open_clip.get_model_config(name)
    if not tag_cfg or model_cfg is None:
        return None
    config = bool(model_cfg.get("quick_gelu", False)) or bool(kwargs.get("force_quick_gelu"))
    tag = bool(tag_cfg.get("quick_gelu", False))
    out: dict[str, Any] = {"config": config, "tag": tag, "mismatch": config != tag}
    if tag and not config:
        alt = name + QUICKGELU_SUFFIX
        out["model_name_fix"] = alt if alt in open_clip.list_models() else None
    elif config and not tag and name.endswith(QUICKGELU_SUFFIX):
        base = name[: -len(QUICKGELU_SUFFIX)]
        out["model_name_fix"] = base if base in open_clip.list_models() else None
    return out


def apply_config_fix(qg: dict[str, Any] | None, args: tuple[Any, ...], kwargs: dict[str, Any],
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``config`` fix: build with the tag's activation (``-quickgelu`` name, or force_quick_gelu)."""
    if not qg or not qg["mismatch"]:
        return args, kwargs
    kwargs = dict(kwargs)
    alt = qg.get("model_name_fix")
    if qg["tag"] and not alt:
        kwargs["force_quick_gelu"] = True
    elif alt:
        if args:
            args = (alt, *args[1:])
        else:
            kwargs["model_name"] = alt
    return args, kwargs


def _wrap_download(fn: Callable[..., Any], via: str, obs: Observer) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        where = args[0] if args else kwargs.get("model_id", kwargs.get("url"))
        filename = kwargs.get("filename", args[1] if len(args) > 1 and via == "hf" else None)
        rec: dict[str, Any] = {"via": via, "source": where, "filename": filename,
                               "offline": os.environ.get("HF_HUB_OFFLINE"), "hf_home": os.environ.get("HF_HOME")}
        try:
            path = fn(*args, **kwargs)
        except BaseException as e:
            obs.emit("download", ok=False, error=error_of(e), **rec)
            raise
        obs.emit("download", ok=True, path=os.fspath(path) if path else None, **rec)
        return path

    return wrapper


def wrap_load_checkpoint(fn: Callable[..., Any], obs: Observer) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(model: Any, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        path = os.fspath(checkpoint_path)
        try:
            out = fn(model, checkpoint_path, *args, **kwargs)
        except BaseException as e:
            obs.emit("weights_failed", model=obs.index(model), via="open_clip.load_checkpoint", error=error_of(e),
                     where=obs.where(), **describe_file(path))
            raise
        obs.emit("weights", model=obs.index(model), via="open_clip.load_checkpoint", where=obs.where(),
                 **describe_file(path))
        return out

    return wrapper


def patch_downloads(obs: Observer) -> None:
    """Record every weights/config download open_clip asks for (factory imported these names itself)."""
    import sys

    pretrained, factory = sys.modules["open_clip.pretrained"], sys.modules["open_clip.factory"]
    hf = _wrap_download(pretrained.download_pretrained_from_hf, "hf", obs)
    url = _wrap_download(pretrained.download_pretrained_from_url, "url", obs)
    for mod in (pretrained, factory):
        if hasattr(mod, "download_pretrained_from_hf"):
            mod.download_pretrained_from_hf = hf  # type: ignore[attr-defined]
        if hasattr(mod, "download_pretrained_from_url"):
            mod.download_pretrained_from_url = url  # type: ignore[attr-defined]
