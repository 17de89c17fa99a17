"""Builds the extension posenc._posenc with CMake (python/CMakeLists.txt) for `pip install .`.

pyproject.toml holds the package's metadata; this file only adds the CMake build and the version,
read from include/posenc/config.hpp. Environment:
  POSENC_CMAKE_BUILD_DIR  an existing CMake build folder of this source tree to build the target
                          posenc_python in (and take the extension from), instead of a new one;
                          scripts/test passes its g++ build, so the extension is compiled once.
  POSENC_CMAKE_ARGS       extra arguments for a new configuration (e.g. -DCMAKE_CXX_COMPILER=clang++).
  POSENC_JOBS             parallel build jobs (default: the CPU count).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def version():
    text = (ROOT / "include" / "posenc" / "config.hpp").read_text()
    parts = [re.search(rf"#define POSENC_VERSION_{p} (\d+)", text).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


class cmake_build_ext(build_ext):
    """Configures (unless POSENC_CMAKE_BUILD_DIR names a configured folder) and builds the CMake target
    posenc_python for this interpreter, then copies the extension where setuptools expects it."""

    def build_extension(self, ext):
        given = os.environ.get("POSENC_CMAKE_BUILD_DIR")
        build = Path(given).resolve() if given else Path(self.build_temp).resolve() / "cmake"
        if not (build / "CMakeCache.txt").exists():
            build.mkdir(parents=True, exist_ok=True)
            args = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DPython3_EXECUTABLE={sys.executable}", "-DPOSENC_BUILD_PYTHON=ON",
                    "-DPOSENC_BUILD_TESTS=OFF", "-DPOSENC_BUILD_EXAMPLES=OFF", "-DPOSENC_BUILD_BENCH=OFF",
                    "-DPOSENC_INSTALL=OFF"]
            args += shlex.split(os.environ.get("POSENC_CMAKE_ARGS", ""))
            subprocess.run(args, check=True)
        jobs = os.environ.get("POSENC_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build), "--target", "posenc_python", "-j", jobs], check=True)
        built = sorted((build / "python" / "posenc").glob("_posenc*" + (".pyd" if os.name == "nt" else ".so")))
        if not built:
            raise RuntimeError(f"posenc: CMake built no extension _posenc in {build / 'python' / 'posenc'}; "
                               "is pybind11 (pybind11-dev) installed? See the configure output above")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[-1], target)


setup(
    version=version(),
    ext_modules=[Extension("posenc._posenc", sources=[])],
    cmdclass={"build_ext": cmake_build_ext},
)
