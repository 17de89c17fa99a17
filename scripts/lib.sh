# Shared by scripts/test and scripts/bench (sourced, not run).

# The Debian packages posenc's scripts need: compilers, CMake, Eigen, Catch2, Google Benchmark,
# clang's sanitizer, fuzzer and OpenMP runtimes (the opt-in OpenMP executor is tested), Open MPI (ring attention), and for the Python
# module, its tests and the plots: pybind11, NumPy, pytest, PyTorch (the tests' reference) and
# Matplotlib; pip, venv, setuptools and wheel for `pip install --no-build-isolation .`; mypy checks the stubs.
# The aarch64 cross compiler (it brings the arm64 libc and libstdc++) and qemu's user-mode emulator build
# and run the test suite for ARM (NEON kernels); Eigen and Catch2 are header-only and serve both targets.
POSENC_PACKAGES=(cmake make g++ clang libclang-rt-14-dev libomp-dev libeigen3-dev catch2 libbenchmark-dev
                 g++-aarch64-linux-gnu qemu-user
                 openmpi-bin libopenmpi-dev
                 python3 python3-dev pybind11-dev python3-pybind11 python3-numpy python3-pytest python3-torch
                 python3-matplotlib python3-pip python3-venv python3-setuptools python3-wheel python3-mypy)

# posenc_ensure_packages PKG...: installs what is missing when run as root (apt-get update only
# if something is missing); otherwise names the missing packages and exits 1.
posenc_ensure_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "posenc: missing packages: ${missing[*]}" >&2
    echo "posenc: install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "posenc: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# posenc_now: seconds since the epoch, with fractions.
posenc_now() { date +%s.%N; }

# posenc_since START: seconds elapsed since START, one decimal.
posenc_since() { awk -v a="$1" -v b="$(posenc_now)" 'BEGIN { printf "%.1f", b - a }'; }
