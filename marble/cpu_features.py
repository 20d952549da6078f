"""What the processor can do, read from /proc/cpuinfo: its name, and whether bf16 is native.

bf16 matrix products are fast only with AVX512-BF16 or AMX. Elsewhere torch emulates them, and
they run far slower than fp32 (docs/bench.md), so `--dtype auto` picks bf16 only where it is
native. The text is a parameter so that tests can hand in another machine's cpuinfo.
"""
from __future__ import annotations

import platform
from pathlib import Path

DTYPES = ("auto", "fp32", "bf16", "fp16")       # what --dtype accepts
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of the bf16 instructions
# Measured on the 2-core AVX2 EPYC: the built-in model's image (64×64, 15 steps, CFG, one thread)
# took 30.5 s in bf16 against 2.18 s in fp32, side by side in one run (docs/bench.md, "--dtype")
EMULATED_BF16_SLOWDOWN = 14


_TORCH_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def dtype_name(dtype) -> str:
    """A torch dtype by the name --dtype gives it (fp32, bf16, fp16)."""
    return _TORCH_NAMES.get(str(dtype), str(dtype).removeprefix("torch."))


def cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _first(text: str, key: str) -> str | None:
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return None


def cpu_name(text: str | None = None) -> str:
    """The processor's model name: timings are only comparable on the same one."""
    name = _first(cpuinfo_text() if text is None else text, "model name")
    return name or platform.processor() or platform.machine()


def cpu_flags(text: str | None = None) -> frozenset[str]:
    """The first processor's feature flags (x86 `flags`, Arm `Features`)."""
    text = cpuinfo_text() if text is None else text
    line = _first(text, "flags") or _first(text, "Features") or ""
    return frozenset(line.split())


KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")   # the flags that pick torch's kernels


def cpu_label(text: str | None = None) -> str:
    """The name and the kernel-deciding flags, for a benchmark's header: both EPYCs here are
    called "AMD EPYC", and only their flags tell them apart."""
    flags = cpu_flags(text)
    return f"{cpu_name(text)} ({' '.join(f for f in KERNEL_FLAGS if f in flags) or 'no AVX2'})"


def native_bf16(text: str | None = None) -> bool:
    """True where bf16 matrix products run in hardware (AMX or AVX512-BF16)."""
    return any(flag in cpu_flags(text) for flag in NATIVE_BF16_FLAGS)


def resolve_dtype(name: str, text: str | None = None) -> str:
    """`auto` -> bf16 where native, else fp32; the other names as they are. ValueError for an
    unknown name."""
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    if name == "auto":
        return "bf16" if native_bf16(text) else "fp32"
    return name


def dtype_warning(name: str, text: str | None = None) -> str | None:
    """The warning for a dtype that will be slow on this CPU, or None."""
    if name == "bf16" and not native_bf16(text):
        return (f"this CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 is emulated and about "
                f"{EMULATED_BF16_SLOWDOWN}x slower than fp32 here; --dtype auto picks fp32")
    if name == "fp16":
        return "fp16 on a CPU is emulated in most kernels and slower than fp32; --dtype auto picks fp32 or bf16"
    return None
