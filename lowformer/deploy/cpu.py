"""What this CPU can run fast, read once from Linux's ``/proc/cpuinfo`` flags: the one place the deploy paths
(int8 weight range, bf16, the candidates ``precision="auto"`` tries) and the benchmarks ask."""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["CpuFeatures", "cpu_features", "cpu_has_vnni"]

_CPUINFO = "/proc/cpuinfo"
# the instruction sets the CPU backends' speed depends on, recorded with every timing
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set extensions that decide which low-precision kernels exist.

    ``vnni``: 8-bit dot products accumulated in 32 bits (AVX512-VNNI, AVX-VNNI or AMX-INT8), without the 16-bit pair
    saturation of plain AVX2 (``vpmaddubsw``) that makes full-range 8-bit weights overflow.
    ``bf16``: native bf16 arithmetic (AVX512-BF16 or AMX-BF16), which oneDNN and OpenVINO use for bf16 graphs."""
    model_name: str
    avx2: bool
    avx512: bool
    vnni: bool
    bf16: bool
    amx: bool
    flags: tuple[str, ...] = ()  # the SPEED_FLAGS Linux reports, in that order

    @property
    def isa_class(self) -> str:
        """A short label of the CPU class for tables, e.g. ``AVX-512+VNNI+BF16`` or ``AVX2``."""
        base = "AVX-512" if self.avx512 else "AVX2" if self.avx2 else "SSE"
        extra = [n for n, has in (("VNNI", self.vnni), ("BF16", self.bf16), ("AMX", self.amx)) if has]
        return "+".join([base, *extra])

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "isa_class": self.isa_class}


def _read_features(cpuinfo: str | os.PathLike) -> CpuFeatures:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    name = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and not name:
            name = value.strip()
    amx = bool(flags & {"amx_tile", "amx_int8", "amx_bf16"})
    return CpuFeatures(
        model_name=name, avx2="avx2" in flags, avx512="avx512f" in flags,
        vnni=bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}), bf16=bool(flags & {"avx512_bf16", "amx_bf16"}),
        amx=amx, flags=tuple(f for f in SPEED_FLAGS if f in flags))


@functools.lru_cache(maxsize=8)
def _cached(cpuinfo: str) -> CpuFeatures:
    return _read_features(cpuinfo)


def cpu_features(cpuinfo: str | os.PathLike = _CPUINFO) -> CpuFeatures:
    """This CPU's features (all False where the file cannot be read, e.g. not Linux)."""
    return _cached(str(cpuinfo))


def cpu_has_vnni(cpuinfo: str | os.PathLike = _CPUINFO) -> bool:
    """Whether this x86 CPU has VNNI dot-product instructions (see :class:`CpuFeatures`)."""
    return cpu_features(cpuinfo).vnni
