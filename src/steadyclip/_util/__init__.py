"""Internal helpers below every layer: the cache directory, atomic writes, digests, fork-safe locks,
future combinators. Nothing here knows about models, numerics or the engine."""
