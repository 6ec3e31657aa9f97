"""Build fastscan's compiled backends with CMake + Ninja (no torch needed at build time).

The libraries are plain shared objects with a C ABI, loaded by fastscan/native.py with ctypes.
They land in fastscan/_lib/. Environment knobs:
  FASTSCAN_BUILD_CUDA=0|1        force the nvcc build off/on (default: on when nvcc is found)
  FASTSCAN_BUILD_CUDA_EMU=0|1    force the CPU-emulated CUDA build off/on (default: when CUDA headers exist)
  FASTSCAN_CUDA_ARCHS="80;90"    CUDA architectures
  FASTSCAN_CPU_ARCH_FLAGS        instruction-set flags for the CPU library (default -march=native)
  MAX_JOBS                       parallel compile jobs
"""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _onoff(name):
    value = os.environ.get(name)
    if value is None or value.upper() in ("", "AUTO"):
        return "AUTO"
    if value.lower() in ("1", "on", "true", "yes"):
        return "ON"
    if value.lower() in ("0", "off", "false", "no"):
        return "OFF"
    raise SystemExit(f"{name}={value!r}: expected 0, 1 or AUTO")


class CMakeBuild(build_ext):
    """Runs CMake once for the whole csrc/ tree; the single Extension only names the output folder."""

    def build_extension(self, ext):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise SystemExit("fastscan: cmake not found; `pip install cmake ninja` (build-system requires them)")
        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_file.parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DFASTSCAN_BUILD_CUDA={_onoff('FASTSCAN_BUILD_CUDA')}",
            f"-DFASTSCAN_BUILD_CUDA_EMU={_onoff('FASTSCAN_BUILD_CUDA_EMU')}",
            f"-DFASTSCAN_CUDA_ARCHS={os.environ.get('FASTSCAN_CUDA_ARCHS', '80;90')}",
        ]
        if "FASTSCAN_CPU_ARCH_FLAGS" in os.environ:
            args.append(f"-DFASTSCAN_CPU_ARCH_FLAGS={os.environ['FASTSCAN_CPU_ARCH_FLAGS']}")
        subprocess.run(args, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        staging = build_dir / "install"
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run([cmake, "--install", str(build_dir), "--prefix", str(staging)], check=True)
        libs = sorted(staging.glob("libfastscan_*"))
        destinations = {out_dir}
        if self.inplace or getattr(self, "editable_mode", False):
            destinations.add(ROOT / "fastscan" / "_lib")
        for dest in destinations:
            dest.mkdir(parents=True, exist_ok=True)
            for old in dest.glob("libfastscan_*"):
                old.unlink()
            for lib in libs:
                # The CPU library doubles as the Extension setuptools expects (same name + ABI tag).
                name = out_file.name if lib.name.startswith(ext.name.rsplit(".", 1)[1] + ".") else lib.name
                shutil.copy2(lib, dest / name)
        print("fastscan: built " + ", ".join(lib.name for lib in libs))


setup(
    ext_modules=[Extension("fastscan._lib.libfastscan_cpu", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
