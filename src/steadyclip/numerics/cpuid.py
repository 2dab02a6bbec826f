"""The CPU as its own ``CPUID`` instruction reports it: vendor, brand, family/model, vector features.

Read by executing ``CPUID`` in this process (a few bytes of x86-64 code in an executable page),
not from ``/proc/cpuinfo``: under an emulator (``qemu-x86_64 -cpu Haswell-v4``) the file still
describes the host, the instruction answers for the CPU the process really runs on. Where
the page cannot be made (not x86-64, W^X policies) the facts come from ``/proc/cpuinfo`` and
say so (``source``).
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import struct
from pathlib import Path
from typing import Any

__all__ = ["cpu_facts"]

# push rbx; mov eax,edi; mov ecx,esi; mov r8,rdx; cpuid; mov [r8],eax; mov [r8+4],ebx;
# mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret   (System V: leaf, subleaf, out pointer)
_CODE = bytes([0x53, 0x89, 0xF8, 0x89, 0xF1, 0x49, 0x89, 0xD0, 0x0F, 0xA2, 0x41, 0x89, 0x00, 0x41, 0x89, 0x58,
               0x04, 0x41, 0x89, 0x48, 0x08, 0x41, 0x89, 0x50, 0x0C, 0x5B, 0xC3])
# (leaf, register index in (eax, ebx, ecx, edx), bit, name): what decides which kernels run.
_FEATURES = ((1, 2, 28, "avx"), (1, 2, 12, "fma"), (7, 1, 5, "avx2"), (7, 1, 16, "avx512f"),
             (7, 2, 11, "avx512_vnni"), (7, 3, 22, "amx_bf16"))


class _Cpuid:
    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(address)

    def __call__(self, leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        self._fn(leaf, sub, ctypes.addressof(out))
        return out[0], out[1], out[2], out[3]


def _from_instruction() -> dict[str, Any]:
    cpuid = _Cpuid()
    top, b, c, d = cpuid(0)
    vendor = struct.pack("<III", b, d, c).decode("ascii", "replace")
    eax1 = cpuid(1)[0]
    family = ((eax1 >> 8) & 0xF) + (((eax1 >> 20) & 0xFF) if ((eax1 >> 8) & 0xF) == 0xF else 0)
    model = ((eax1 >> 4) & 0xF) | (((eax1 >> 16) & 0xF) << 4 if ((eax1 >> 8) & 0xF) in (6, 15) else 0)
    regs = {leaf: cpuid(leaf) for leaf in (1, 7) if leaf <= top}
    features = [name for leaf, reg, bit, name in _FEATURES if leaf in regs and regs[leaf][reg] >> bit & 1]
    brand = ""
    if cpuid(0x80000000)[0] >= 0x80000004:
        brand = b"".join(struct.pack("<IIII", *cpuid(leaf)) for leaf in (0x80000002, 0x80000003, 0x80000004)
                         ).decode("ascii", "replace").strip("\x00 ")
    return {"source": "cpuid", "cpu_vendor": vendor, "cpu_model": brand or None, "family": family, "model": model,
            "features": " ".join(features)}


def _from_proc() -> dict[str, Any]:
    facts: dict[str, Any] = {"source": "/proc/cpuinfo", "cpu_vendor": None, "cpu_model": None, "features": None}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return facts
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("vendor_id", "CPU implementer") and facts["cpu_vendor"] is None:  # x86, Arm
            facts["cpu_vendor"] = value
        elif key in ("model name", "Model", "CPU part") and facts["cpu_model"] is None:
            facts["cpu_model"] = value
        elif key == "flags" and facts["features"] is None:
            flags = set(value.split())
            facts["features"] = " ".join(n for _, _, _, n in _FEATURES if n in flags)
    if facts["cpu_model"] is None:
        facts["cpu_model"] = platform.processor() or platform.machine() or None
    return facts


@functools.lru_cache(maxsize=1)
def cpu_facts() -> dict[str, Any]:
    """Vendor, brand string, family/model and the vector features that pick kernels (``source`` says how read)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        try:
            return _from_instruction()
        except (OSError, ValueError, AttributeError):  # no executable page here: read the file
            pass
    return _from_proc()
