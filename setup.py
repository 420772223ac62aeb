"""Builds layerline's CPU kernel for packed weights (runtime/model/native) with CMake.

The kernel is optional: without a C++ compiler or CMake, or if the build fails for any
other reason, layerline installs without it, records why next to where it would have
been, and runs on mlx's own quantized kernels (see runtime/model/cpu_kernel.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL = "layerline.runtime.model._cpu_kernel"
SOURCE_DIR = Path(__file__).resolve().parent / "runtime" / "model" / "native"
BUILD_ERROR_FILE = "_cpu_kernel.build-error.txt"


class OptionalCMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        # An editable install builds elsewhere and copies the module into the source tree.
        places = {target.parent}
        if getattr(self, "editable_mode", False) or self.inplace:
            places.add(SOURCE_DIR.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._cmake(target)
        except Exception as exc:  # noqa: BLE001 - any failure leaves mlx's kernels in use
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            for place in places:
                (place / target.name).unlink(missing_ok=True)  # no stale kernel from an earlier build
                (place / BUILD_ERROR_FILE).write_text(reason + "\n", encoding="utf-8")
            print(f"layerline: the CPU kernel was not built ({reason}); layerline will use mlx's "
                  "quantized kernels on CPU", file=sys.stderr)
            return
        for place in places:
            (place / BUILD_ERROR_FILE).unlink(missing_ok=True)

    def _cmake(self, target: Path) -> None:
        if os.environ.get("LAYERLINE_BUILD_KERNEL", "1").lower() in ("0", "off", "no"):
            raise RuntimeError("LAYERLINE_BUILD_KERNEL=0 skipped it")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("no cmake found: apt-get install build-essential cmake")
        build_dir = Path(self.build_temp).resolve() / "cpu_kernel"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DPython_EXECUTABLE={sys.executable}",
                     f"-DLAYERLINE_KERNEL_OUTPUT_DIR={target.parent}"]
        for argv in (configure, [cmake, "--build", str(build_dir), "-j", str(min(os.cpu_count() or 1, 4))]):
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode != 0:
                why = _first_error(result.stderr + result.stdout)
                raise RuntimeError(f"{Path(argv[0]).name} failed: {why}")
        if not target.exists():
            raise RuntimeError(f"cmake built no {target.name}")


def _first_error(output: str) -> str:
    """The first error in a build's output, with the line after a `CMake Error at …` header."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "error" in line.lower():
            detail = lines[i + 1] if line.startswith("CMake Error") and i + 1 < len(lines) else ""
            return f"{line} {detail}".strip()[:300]
    return (lines[-1] if lines else "no output")[:300]


# optional: setuptools copies no module that was not built.
setup(ext_modules=[Extension(KERNEL, sources=[], optional=True)], cmdclass={"build_ext": OptionalCMakeBuild})
