"""Making mlx use an optimized BLAS on Linux: load one before mlx is first imported.

mlx's Linux CPU wheel links the reference BLAS, which is 10-80x slower on f32
matmuls than OpenBLAS. A BLAS loaded with RTLD_GLOBAL before `import mlx`
provides the `cblas_*` symbols mlx resolves, so the process uses it instead.
`layerline/__init__.py` calls `load_fast_blas()` first thing for that reason.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from dataclasses import dataclass

ENV_VAR = "LAYERLINE_BLAS"  # a libblas.so path to load, or "reference" to load none
# OpenBLAS's worker threads spin for 2^28 cycles (~0.1 s) after each call by default. With
# several stages on one machine, a waiting stage's spinning workers take the cores the
# computing stage needs (split serving measured 10-15 % slower); 2^4 cycles lets them sleep
# at once, which costs nothing measurable on one stage. A value the user set is kept.
THREAD_TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
THREAD_TIMEOUT = "4"
_OFF_VALUES = ("reference", "none", "off", "0")

# Debian/Ubuntu packages, in order of preference (libopenblas0-pthread first).
_DEBIAN_LIBS = (
    "openblas-pthread/libblas.so.3",
    "openblas-openmp/libblas.so.3",
    "openblas-serial/libblas.so.3",
    "blis-pthread/libblas.so.3",
    "blis-openmp/libblas.so.3",
)
_INSTALL_HINT = "apt-get install libopenblas0-pthread"


@dataclass(frozen=True)
class BlasInfo:
    name: str  # "openblas", "blis", "accelerate", "reference", or the file name loaded
    path: str | None
    fast: bool
    reason: str

    def describe(self) -> str:
        """One log-line fragment: `blas=openblas (…path…)` or why the slow one is in use."""
        where = f" {self.path}" if self.path else ""
        return f"blas={self.name}{where} fast={'yes' if self.fast else 'no'} ({self.reason})"


def candidate_paths() -> list[str]:
    """Optimized BLAS libraries to try, best first, for this machine's Debian multiarch dir."""
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    return [f"/usr/lib/{arch}-linux-gnu/{lib}" for lib in _DEBIAN_LIBS]


def _name_of(path: str) -> str:
    lowered = path.lower()
    for name in ("openblas", "blis", "mkl"):
        if name in lowered:
            return name
    return os.path.basename(path)


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def global_cblas() -> str | None:
    """The file whose `cblas_sgemm` libraries loaded from now on will bind to, if any.

    Only the process's global symbols count: numpy's bundled OpenBLAS, for one,
    is loaded privately with renamed symbols, and mlx cannot use it.
    """
    try:
        process = ctypes.CDLL(None)
        symbol = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
        info = _DlInfo()
        if not process.dladdr(symbol, ctypes.byref(info)) or not info.dli_fname:
            return None
    except (OSError, AttributeError):
        return None
    return os.path.realpath(info.dli_fname.decode(errors="replace"))


def _is_fast(path: str) -> bool:
    return _name_of(path) in ("openblas", "blis", "mkl")


@functools.cache  # the BLAS is a fact of the process: decided once, before mlx loads
def load_fast_blas() -> BlasInfo:
    """Load an optimized BLAS for mlx if this is Linux and one is installed; never raises."""
    if sys.platform == "darwin":
        return BlasInfo("accelerate", None, True, "mlx on macOS uses Accelerate")
    if not sys.platform.startswith("linux"):
        return BlasInfo("unknown", None, False, f"no BLAS policy for {sys.platform}")

    provider = global_cblas()
    if provider and _is_fast(provider):
        return BlasInfo(_name_of(provider), provider, True, "already loaded: LD_PRELOAD or an earlier load")

    requested = os.environ.get(ENV_VAR, "").strip()
    if requested.lower() in _OFF_VALUES:
        return BlasInfo("reference", None, False, f"{ENV_VAR}={requested} asks for mlx's own BLAS")
    if "mlx.core" in sys.modules:
        return BlasInfo(
            "reference", None, False,
            "mlx was imported before layerline, too late to load a fast BLAS; import layerline "
            "first, or start with LD_PRELOAD=<libopenblas>",
        )

    paths = [requested] if requested else candidate_paths()
    os.environ.setdefault(THREAD_TIMEOUT_ENV, THREAD_TIMEOUT)  # read when OpenBLAS loads
    failures = []
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as exc:
            failures.append(f"{path}: {exc}")
            continue
        # None means dladdr is unavailable here, not that the load failed.
        provider = global_cblas()
        if provider is not None and not _is_fast(provider) and provider != os.path.realpath(path):
            failures.append(f"{path} loaded, but cblas_sgemm still comes from {provider}")
            continue
        return BlasInfo(_name_of(provider or path), path, True, "loaded before mlx")
    if requested:
        why = failures[0] if failures else f"{ENV_VAR}={requested} does not exist"
        return BlasInfo("reference", None, False, f"{why}; using mlx's reference BLAS")
    why = "; ".join(failures) if failures else "no OpenBLAS or BLIS found"
    return BlasInfo(
        "reference", None, False,
        f"{why}; f32 matmuls will be 10-80x slower: {_INSTALL_HINT}",
    )
