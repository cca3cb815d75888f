"""Installs moreau_kernels and moreau_pruner (from python/), and builds moreau_kernels/_C.so.

The native library (csrc/) is built by CMake with Ninja (CMakeLists.txt). Environment:

* ``MOREAU_BUILD_CUDA``: ``1`` forces the CUDA kernels on, ``0`` off; unset: on when torch is a
  CUDA build and nvcc is found (``CUDA_HOME`` or /usr/local/cuda/bin/nvcc).
* ``MOREAU_CUDA_ARCHS``: CUDA architectures, default ``80;90``.
* ``MOREAU_CPU_FLAGS``: ISA flags of the CPU kernels, default ``-march=native``.
* ``MAX_JOBS``: parallel compile jobs (default: all cores).
* ``MOREAU_CMAKE_BUILD_DIR``: CMake's build folder (default build/cmake-pyXY, kept for rebuilds).
* ``MOREAU_SKIP_NATIVE=1``: do not build it; ``MOREAU_REQUIRE_NATIVE=1``: a failed build is an error.

Without a compiler, CMake or torch at build time the package still installs (pure Python: the
ops then run on the reference backend) and a warning says so.
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _warn(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (moreau_kernels): {msg}\nThe package installs without its native "
          f"library; the ops run on the pure-PyTorch reference backend.\n`python -m moreau_kernels.info` "
          f"shows what is available.\n{bar}\n", file=sys.stderr, flush=True)


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname):
        # moreau_kernels/_C.so: loaded with torch.ops.load_library, not imported, so no ABI tag
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext):
        if os.environ.get("MOREAU_SKIP_NATIVE") == "1":
            _warn("MOREAU_SKIP_NATIVE=1: the native library was not built.")
            self._skip(ext)
            return
        try:
            self._build_cmake(ext)
        except Exception as e:  # noqa: BLE001 -- any failure leaves a working pure-Python install
            if os.environ.get("MOREAU_REQUIRE_NATIVE") == "1":
                raise
            _warn(f"building the native library failed: {e}")
            self._skip(ext)

    def _skip(self, ext):
        # forget the extension, so that the in-place copy and the wheel's file list do not
        # look for a library that was not built
        self.extensions = [e for e in self.extensions if e is not ext]

    def get_outputs(self):
        return [p for p in super().get_outputs() if os.path.exists(p)]

    def _build_cmake(self, ext):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake, or apt-get install cmake)")
        try:
            import torch  # noqa: F401 -- CMake asks this interpreter where torch is
        except ImportError as e:
            raise RuntimeError(f"torch is not importable at build time ({e}); install torch first and "
                               "use `pip install --no-build-isolation`") from e
        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        # a stable folder (not pip's temporary build_temp) so that rebuilds are incremental
        build_dir = os.environ.get("MOREAU_CMAKE_BUILD_DIR") or os.path.join(
            ROOT, "build", f"cmake-py{sys.version_info[0]}{sys.version_info[1]}")
        os.makedirs(build_dir, exist_ok=True)
        cuda = {"1": "ON", "0": "OFF", "": "AUTO"}.get(os.environ.get("MOREAU_BUILD_CUDA", ""), None)
        if cuda is None:
            raise RuntimeError(f"MOREAU_BUILD_CUDA must be 0 or 1, got {os.environ['MOREAU_BUILD_CUDA']!r}")
        args = [
            cmake, "-S", ROOT, "-B", build_dir,
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMOREAU_OUTPUT_DIR={out_dir}",
            f"-DMOREAU_BUILD_CUDA={cuda}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("MOREAU_CUDA_ARCHS"):
            args.append(f"-DMOREAU_CUDA_ARCHS={os.environ['MOREAU_CUDA_ARCHS']}")
        if os.environ.get("MOREAU_CPU_FLAGS"):
            args.append(f"-DMOREAU_CPU_FLAGS={os.environ['MOREAU_CPU_FLAGS']}")
        if not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")) and shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.run(args, check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", build_dir, "--parallel", jobs], check=True)


def _pruner_packages() -> list[str]:
    """python/moreau_pruner and every folder below it that is a package (has an __init__.py)."""
    base = os.path.join(ROOT, "python", "moreau_pruner")
    return sorted(os.path.relpath(d, ROOT).replace(os.sep, "/") for d, _, files in os.walk(base)
                  if "__init__.py" in files)


setup(
    packages=["moreau_kernels", "moreau_kernels.triton_ops"]
    + ["moreau_pruner" + p[len("python/moreau_pruner"):].replace("/", ".") for p in _pruner_packages()],
    package_dir={"moreau_kernels": "moreau_kernels", "moreau_pruner": "python/moreau_pruner"},
    package_data={"moreau_pruner.io": ["templates/*.py"]},
    ext_modules=[CMakeExtension("moreau_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
