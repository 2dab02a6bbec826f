"""The portable profile's process: the CLI starts itself again with the variables it needs.

The portable numerics (:mod:`steadyclip.numerics.portable`) need variables that torch and numpy
read when they load; by the time a command's options are parsed they are loaded. So a command
asked for ``portable`` in a process without them replaces itself (``exec``) with the same
command, the variables added, once. Where the CLI is not its own process (called from Python,
a test's CLI runner) it never execs: the engine raises its typed error instead.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from steadyclip.numerics.early import portable_env_problems, portable_environ

_MARK = "STEADYCLIP_PORTABLE_EXEC"


def _own_process() -> bool:
    """Is this process the ``steadyclip`` command itself (the console script or ``python -m steadyclip``)?"""
    first = Path(sys.argv[0]) if sys.argv else Path()
    return first.name in ("steadyclip", "steadyclip.exe") or first.parts[-2:] == ("steadyclip", "__main__.py")


def arrange_portable_process() -> None:
    """Make this command's process one the portable profile can run in, or leave the refusal to the engine.

    Execs ``python -m steadyclip <same arguments>`` with :data:`~steadyclip.numerics.early.PORTABLE_ENV`
    added when a variable is missing and this process is the CLI's own; at most once (the child is
    marked), so a variable something else keeps undoing ends in the engine's typed error, not a loop.
    """
    if not portable_env_problems() or not _own_process() or os.environ.get(_MARK):
        return
    env = portable_environ()
    env[_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "steadyclip", *sys.argv[1:]], env)
