"""Where a model comes from and how it is loaded: sources (tags, hub, local files), safe checkpoint
reads, hashes and fingerprints, lockfiles, conversion, the bundled registry, and ``load()``.

Imports ``numerics`` (identity, devices) and nothing above it.
"""
