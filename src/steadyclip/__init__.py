"""steadyclip: OpenCLIP inference that gives the same answer every time."""
from __future__ import annotations

__version__ = "0.1.0"
