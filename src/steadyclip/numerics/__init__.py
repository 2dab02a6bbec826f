"""What decides a forward's bits: the settings that precede torch's start-up (``early``), the
flags torch runs under (``environment``, ``determinism``), the profiles, the identity that hashes
them one way, the zero-shot head's arithmetic, the self-checks and measured drift.

The lowest layer that knows torch: it imports nothing from ``model`` or ``engine``. This
``__init__`` stays import-free, since ``steadyclip/__init__`` runs ``early`` before torch starts.
"""
