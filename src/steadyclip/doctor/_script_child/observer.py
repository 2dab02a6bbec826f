"""The observer injected into the user's script: records open_clip use, changes nothing unless told to.

It writes one JSON object per line to the file named by ``TRACE_ENV`` and never
prints. Recorded: every model an open_clip factory creates (architecture,
``pretrained``, whether and which weights were loaded, the file's SHA-256), the
transforms it returned, and for every top-level ``encode_image`` /
``encode_text`` / ``forward``: the user's file and line, train/eval state, the
random or batch-dependent layers active, autocast, the numerics flags, which
transform made the inputs, a digest of the weights and of the output.

Interventions (``FIXES_ENV``, comma-separated) each remove one suspected cause:
``eval`` (eval() before every call), ``eval_transform`` (the factory's training
transform replaced by its eval transform), ``no_autocast``, ``pin_weights``
(the same state dict before the first call of every run), ``strict_flags``
(deterministic torch/cuDNN flags), ``seed`` (torch/random/numpy seeded) and
``config`` (a model built with the activation its pretrained tag was trained
with: the ``-quickgelu`` name open_clip warns about).

Only the standard library is imported here; see the package docstring for why.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import linecache
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import FrameType, ModuleType
from typing import Any

TRACE_ENV = "STEADYCLIP_DOCTOR_TRACE"
FIXES_ENV = "STEADYCLIP_DOCTOR_FIXES"
PIN_DIR_ENV = "STEADYCLIP_DOCTOR_PIN_DIR"
FIXES = ("config", "pin_weights", "eval", "eval_transform", "no_autocast", "strict_flags", "seed")
SEED = 0
_MAX_DATA = 1 << 16  # outputs up to this many values travel whole (the parent computes probabilities from them)
_LIST = 20
_SKIP_DIRS = ("open_clip", "torch", "torchvision", "timm", "importlib", "runpy", "_script_child")


class Observer:
    """Holds the trace file, the models seen and the requested fixes of one script process."""

    def __init__(self, trace_path: str, fixes: Sequence[str], pin_dir: str | None, script: str) -> None:
        self._out = open(trace_path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life
        self.fixes = frozenset(fixes)
        self.pin_dir = pin_dir
        self.script = os.path.realpath(script)
        self.models: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self.roles: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self.loaded_files: dict[int, str] = {}  # id(state dict) -> the file it came from
        self.used: dict[str, int] = {}  # transform roles applied since the last encode_image
        self.texts: list[str] | None = None
        self.pinned: set[int] = set()
        self.seeded: set[int] = set()  # created from a seeded RNG (pin_weights): random init the same every run
        self.loaded: set[int] = set()  # had a state dict loaded into them
        self.seq = 0
        self.local = threading.local()
        self.t0 = time.perf_counter()

    def emit(self, event: str, **fields: Any) -> None:
        fields["event"] = event
        self._out.write(json.dumps(fields, default=str) + "\n")
        self._out.flush()

    def where(self) -> dict[str, Any]:
        """The caller in the user's code: the script itself if on the stack, else the first non-library frame."""
        f: FrameType | None = sys._getframe(1)
        first: FrameType | None = None
        while f is not None:
            name = f.f_code.co_filename
            if os.path.realpath(name) == self.script:
                first = f
                break
            if first is None and not any(f"{os.sep}{d}{os.sep}" in name for d in _SKIP_DIRS) \
                    and not name.startswith("<"):
                first = f
            f = f.f_back
        if first is None:
            return {"file": None, "line": None, "code": None}
        fn, line = first.f_code.co_filename, first.f_lineno
        return {"file": fn, "line": line, "code": linecache.getline(fn, line).strip(), "function": first.f_code.co_name}

    def index(self, model: Any) -> int:
        if model not in self.models:
            self.models[model] = len(self.models)
        return self.models[model]

    def depth(self, key: str, delta: int) -> int:
        d: int = getattr(self.local, key, 0) + delta
        setattr(self.local, key, d)
        return d


_OBS: Observer | None = None


def _transform_ops(t: Any) -> list[str]:
    out: list[str] = []
    for op in getattr(t, "transforms", None) or [t]:
        out.append(type(op).__name__)
        if getattr(op, "transforms", None) is not None:
            out.extend(_transform_ops(op))
    return out


# --- open_clip factories -----------------------------------------------------------------------------------

def _wrap_factory(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        obs = _OBS
        assert obs is not None
        if obs.depth("create", 1) > 1:  # create_model_and_transforms calls create_model: one model, one record
            try:
                return fn(*args, **kwargs)
            finally:
                obs.depth("create", -1)
        loads = _load_sibling("loads")
        pretrained = kwargs.get("pretrained", args[1] if len(args) > 1 else None)
        arch = kwargs.get("model_name", args[0] if args else None)
        where = obs.where()
        qg = loads.quick_gelu(arch, pretrained, kwargs)
        if "config" in obs.fixes:
            args, kwargs = loads.apply_config_fix(qg, args, kwargs)
        rng = _seed_rng() if "pin_weights" in obs.fixes else None
        try:
            with loads.captured_warnings() as caught:
                out = fn(*args, **kwargs)
        except BaseException as e:
            obs.emit("create_failed", fn=name, arch=arch, pretrained=pretrained, where=where,
                     error=loads.error_of(e), warnings=caught, quick_gelu=qg)
            raise
        finally:
            obs.depth("create", -1)
            if rng is not None:
                sys.modules["torch"].set_rng_state(rng)
        model = out[0] if isinstance(out, tuple) else out
        k = obs.index(model)
        if rng is not None:
            obs.seeded.add(k)
        obs.emit("model", model=k, fn=name, arch=arch, pretrained=pretrained, cls=type(model).__name__,
                 where=where, warnings=caught, quick_gelu=qg)
        if isinstance(out, tuple) and len(out) >= 2:
            out = _record_transforms(obs, k, out)
        return out

    return wrapper


def _seed_rng() -> Any:
    """pin_weights for random init: the same RNG state for creation in every run, the script's own after.

    Saving and reloading the state dict would pin it too, at the cost of writing the whole model to disk
    in every pinned run (hundreds of MB for ViT-B-32); the RNG state costs nothing.
    """
    torch = sys.modules["torch"]
    state = torch.get_rng_state()
    torch.manual_seed(SEED)
    return state


def _record_transforms(obs: Observer, k: int, out: tuple[Any, ...]) -> tuple[Any, ...]:
    roles = ["train", "eval"] if len(out) == 3 else ["eval"]
    transforms = list(out[1:])
    obs.emit("transforms", model=k, **{r: _transform_ops(t) for r, t in zip(roles, transforms, strict=True)})
    for r, t in zip(roles, transforms, strict=True):
        try:
            obs.roles[t] = r
        except TypeError:  # not weak-referenceable: it is still described, just not tracked
            pass
    if "eval_transform" in obs.fixes and len(out) == 3:
        return (out[0], out[2], out[2])
    return out


def _wrap_file_loader(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.load / safetensors load_file: remember which file a state dict came from."""

    @functools.wraps(fn)
    def wrapper(f: Any, *args: Any, **kwargs: Any) -> Any:
        obs = _OBS
        try:
            out = fn(f, *args, **kwargs)
        except BaseException as e:
            if obs is not None and isinstance(f, (str, os.PathLike)):  # the file the script crashed on
                loads = _load_sibling("loads")
                obs.emit("file_failed", via=getattr(fn, "__name__", "load"), error=loads.error_of(e),
                         where=obs.where(), **loads.describe_file(os.fspath(f)))
            raise
        if obs is not None and isinstance(f, (str, os.PathLike)) and isinstance(out, dict):
            obs.loaded_files[id(out)] = os.path.abspath(os.fspath(f))
            inner = out.get("state_dict")
            if isinstance(inner, dict):
                obs.loaded_files[id(inner)] = obs.loaded_files[id(out)]
        return out

    return wrapper


def _wrap_load_state_dict(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: Any, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        obs = _OBS
        assert obs is not None
        out = fn(self, state_dict, *args, **kwargs)
        if obs.depth("pin", 0) == 0:
            obs.loaded.add(obs.index(self))
        if obs.depth("create", 0) == 0 and obs.depth("pin", 0) == 0:  # inside a factory: load_checkpoint reports
            path = obs.loaded_files.get(id(state_dict))
            missing = list(getattr(out, "missing_keys", []) or [])
            obs.emit("weights", model=obs.index(self), via="load_state_dict", missing_keys=len(missing),
                     where=obs.where(), **_load_sibling("loads").describe_file(path))
        return out

    return wrapper


def _wrap_transform_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        obs = _OBS
        if obs is not None:
            try:
                role = obs.roles.get(self)
            except TypeError:
                role = None
            if role is not None:
                obs.used[role] = obs.used.get(role, 0) + 1
        return fn(self, *args, **kwargs)

    return wrapper


def _wrap_tokenizer(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        obs = _OBS
        texts = kwargs.get("texts", next((a for a in args if isinstance(a, (str, list, tuple))), None))
        if obs is not None and texts is not None:
            obs.texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
        return fn(*args, **kwargs)

    return wrapper


def _patch_open_clip(mod: ModuleType) -> None:
    factory = sys.modules["open_clip.factory"]
    for name in ("create_model", "create_model_and_transforms", "create_model_from_pretrained"):
        wrapped = _wrap_factory(getattr(factory, name), name)
        setattr(factory, name, wrapped)
        setattr(mod, name, wrapped)
    obs = _OBS
    assert obs is not None
    loads = _load_sibling("loads")
    loader = loads.wrap_load_checkpoint(factory.load_checkpoint, obs)
    factory.load_checkpoint = loader  # type: ignore[attr-defined]
    mod.load_checkpoint = loader  # type: ignore[attr-defined]
    loads.patch_downloads(obs)
    mod.tokenize = _wrap_tokenizer(mod.tokenize)  # type: ignore[attr-defined]
    for cls_name in ("SimpleTokenizer", "HFTokenizer", "SigLipTokenizer"):
        cls = getattr(sys.modules["open_clip.tokenizer"], cls_name, None)
        if cls is not None:
            cls.__call__ = _wrap_tokenizer(cls.__call__)
    from torchvision import (
        transforms,  # open_clip's transforms are torchvision Compose objects
    )

    transforms.Compose.__call__ = _wrap_transform_call(transforms.Compose.__call__)
    _load_sibling("calls").patch_model_classes(obs, _wrap_load_state_dict)
    obs.emit("import", module="open_clip", version=getattr(mod, "__version__", None),
             torch=sys.modules["torch"].__version__)


def _load_sibling(name: str) -> Any:
    """A module next to this file, loaded by path: the script's own sys.path must not decide what runs here."""
    full = f"_steadyclip_doctor_{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, os.path.join(os.path.dirname(__file__), f"{name}.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    spec.loader.exec_module(mod)
    return mod


def _patch_torch(mod: ModuleType) -> None:
    mod.load = _wrap_file_loader(mod.load)  # type: ignore[attr-defined]
    if _OBS is not None and "seed" in _OBS.fixes:
        mod.manual_seed(SEED)


def _patch_safetensors(mod: ModuleType) -> None:
    mod.load_file = _wrap_file_loader(mod.load_file)  # type: ignore[attr-defined]


def _patch_numpy(mod: ModuleType) -> None:
    if _OBS is not None and "seed" in _OBS.fixes:
        mod.random.seed(SEED)


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, hook: Callable[[ModuleType], None]) -> None:
        self.inner, self.hook = inner, hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        self.hook(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs a hook right after a chosen module has executed, however and whenever the script imports it."""

    def __init__(self, hooks: dict[str, Callable[[ModuleType], None]]) -> None:
        self.hooks, self.busy = hooks, set[str]()

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        hook = self.hooks.get(fullname)
        if hook is None or fullname in self.busy:
            return None
        self.busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PostImportLoader(spec.loader, hook)
        return spec


def install(script: str) -> Observer | None:
    """Start observing when the parent asked for it (``TRACE_ENV`` set); a no-op otherwise."""
    global _OBS
    trace = os.environ.get(TRACE_ENV)
    if not trace:
        return None
    fixes = [f for f in os.environ.get(FIXES_ENV, "").split(",") if f]
    unknown = sorted(set(fixes) - set(FIXES))
    if unknown:
        raise ValueError(f"{FIXES_ENV} has unknown fixes {unknown}; known: {', '.join(FIXES)}")
    _OBS = Observer(trace, fixes, os.environ.get(PIN_DIR_ENV), script)
    if "seed" in _OBS.fixes:
        random.seed(SEED)
    sys.meta_path.insert(0, _PostImportFinder({
        "torch": _patch_torch, "open_clip": _patch_open_clip, "safetensors.torch": _patch_safetensors,
        "numpy": _patch_numpy,
    }))
    _OBS.emit("start", script=os.path.abspath(script), argv=sys.argv, fixes=sorted(_OBS.fixes),
              python=sys.version.split()[0])
    return _OBS


def finish(returncode: int) -> None:
    if _OBS is not None:
        _OBS.emit("end", returncode=returncode, seconds=round(time.perf_counter() - _OBS.t0, 4))


__all__ = ["FIXES", "FIXES_ENV", "PIN_DIR_ENV", "TRACE_ENV", "Observer", "finish", "install"]
