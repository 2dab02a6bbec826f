"""One record of how an engine runs: :class:`EngineSettings`.

The CLI, the server and the batch runner build one; Ray actors, lockfiles, the behaviour
probe and the fast profile's strict twin all receive it through :meth:`EngineSettings.to_dict`
and :meth:`EngineSettings.from_dict`, so a setting added here travels everywhere at once.

What is requested here is not always what runs: ``threads`` > 1 is used only where the
thread self-check proves rows equal to rows at 1 thread (:mod:`steadyclip.numerics.selfcheck`),
and ``replicas=None`` becomes one per usable CPU. What really ran is in the engine's
:class:`~steadyclip.results.Provenance` and :class:`~steadyclip.engine.layout.ExecutionRecord`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from steadyclip.engine.layout import check_count
from steadyclip.errors import InputError
from steadyclip.numerics.profiles import PROFILES, Profile

__all__ = ["BatchInvariance", "EngineSettings"]

BatchInvariance = Literal["auto", "fixed"]
SETTINGS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How an :class:`~steadyclip.Engine` computes: numerics profile, shapes and layout.

    Args:
        profile: ``"strict"`` (fp32, bitwise reproducible), ``"fast"``, or a :class:`Profile`.
        micro_batch: rows per image forward (every image forward runs at exactly this shape).
        text_micro_batch: rows per text forward (at each text's own sequence-length bucket); the
            shape a text's bits follow (multiples of it run where proven to give the same bits).
        text_buckets: ``"auto"`` (sequence lengths 8, 12, 16, 24, 32, 48 and the context length, where the text
            tower's causal mask makes them exact: :mod:`steadyclip.engine.text_shapes`), ``"full"``
            (every text at the context length), or explicit lengths.
        threads: intra-op threads per replica; ``None`` = 1. More than 1 runs only where a
            self-check proves rows equal to rows at 1 thread.
        replicas: processes running forwards for work bigger than one micro-batch; ``None`` =
            one per ``threads`` usable CPUs; 1 = only this process.
        batch_invariance: ``"auto"`` self-checks and may skip padding; ``"fixed"`` always pads.
        onednn: oneDNN convolutions; ``None`` = the profile's default (off in strict).
        allow_emulated_bf16: run ``fast`` on a CPU without native bf16 anyway (recorded).

    Example:
        >>> EngineSettings(micro_batch=4).replace(profile="fast").to_dict()["profile"]
        'fast'
    """

    profile: str | Profile = "strict"
    micro_batch: int = 8
    text_micro_batch: int = 8
    threads: int | None = None
    replicas: int | None = None
    batch_invariance: BatchInvariance = "auto"
    onednn: bool | None = None
    allow_emulated_bf16: bool = False
    text_buckets: tuple[int, ...] | str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.profile, str) and self.profile not in PROFILES:
            raise InputError(f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if not isinstance(self.profile, (str, Profile)):
            raise InputError(f"profile must be 'strict', 'fast' or a Profile, got {self.profile!r}")
        check_count("micro_batch", self.micro_batch, allow_auto=False)
        check_count("text_micro_batch", self.text_micro_batch, allow_auto=False)
        # "auto" is accepted for the counts (the CLI's spelling of the default) and stored as None
        object.__setattr__(self, "threads", check_count("threads", self.threads))
        object.__setattr__(self, "replicas", check_count("replicas", self.replicas))
        if self.batch_invariance not in ("auto", "fixed"):
            raise InputError(f"batch_invariance must be 'auto' or 'fixed', got {self.batch_invariance!r}")
        buckets = self.text_buckets
        if isinstance(buckets, list):
            buckets = tuple(buckets)
            object.__setattr__(self, "text_buckets", buckets)
        if not (buckets in ("auto", "full") or (isinstance(buckets, tuple) and buckets and all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 2 for b in buckets))):
            raise InputError(f"text_buckets must be 'auto', 'full' or sequence lengths >= 2, got {buckets!r}")
        if self.onednn is not None and not isinstance(self.onednn, bool):
            raise InputError(f"onednn must be True, False or None, got {self.onednn!r}")

    @property
    def requested_threads(self) -> int:
        """The intra-op thread count asked for (1 unless set)."""
        return 1 if self.threads is None else self.threads

    @property
    def profile_name(self) -> str:
        return self.profile if isinstance(self.profile, str) else self.profile.name

    def replace(self, **changes: Any) -> EngineSettings:
        """A copy with ``changes`` applied (validated like the original)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The one serialised form (JSON-friendly): Ray actors, lockfiles, the probe, drift's twin."""
        doc = dataclasses.asdict(self)
        doc["profile"] = self.profile if isinstance(self.profile, str) else self.profile.to_dict()
        doc["text_buckets"] = self.text_buckets if isinstance(self.text_buckets, str) else list(self.text_buckets)
        doc["version"] = SETTINGS_VERSION
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> EngineSettings:
        """Inverse of :meth:`to_dict`.

        Raises:
            InputError: not a settings document (unknown keys, wrong version, bad values).
        """
        if not isinstance(doc, dict):
            raise InputError(f"engine settings must be a JSON object, got {type(doc).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        body = {k: v for k, v in doc.items() if k != "version"}
        unknown = sorted(set(body) - fields)
        if unknown or doc.get("version", SETTINGS_VERSION) != SETTINGS_VERSION:
            raise InputError(f"unreadable engine settings (unknown keys {unknown}, version {doc.get('version')!r}); "
                             f"written by another steadyclip version? Expected version {SETTINGS_VERSION}")
        if isinstance(body.get("profile"), dict):
            try:
                body["profile"] = Profile(**body["profile"])
            except TypeError as e:
                raise InputError(f"unreadable profile in engine settings: {body['profile']!r} ({e})") from e
        return cls(**body)
