#!/usr/bin/env bash
# Installs the posenc package with pip (pyproject.toml) into a fresh virtual environment that sees the
# system's packages, and runs the pytest suite of tests/python against the installed package, not
# the build tree. Offline: --no-build-isolation --no-index.
#
# Usage: tests/python/installed.sh BUILD_DIR
#   BUILD_DIR  a configured CMake build folder of this tree with the Python module (scripts/test's
#              g++ build): the extension is taken from it (built there if out of date), not compiled
#              again; the environment goes to BUILD_DIR/venv.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=$(cd "${1:?usage: tests/python/installed.sh BUILD_DIR}" && pwd)
venv="$build/venv"
python=${POSENC_PYTHON:-/usr/bin/python3}

rm -rf "$venv"
"$python" -m venv --system-site-packages "$venv"
POSENC_CMAKE_BUILD_DIR="$build" "$venv/bin/python" -m pip install --no-build-isolation --no-index \
  --disable-pip-version-check -q "$root"
cd "$build"  # not the source tree, so that `import posenc` can only find the installed package
"$venv/bin/python" -c "import posenc; print('installed posenc', posenc.__version__, 'at', posenc.__file__)"
POSENC_EXPECT_INSTALLED="$venv" PYTHONDONTWRITEBYTECODE=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "$root/tests/python"
