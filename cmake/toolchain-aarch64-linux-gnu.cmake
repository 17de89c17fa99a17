# Cross-compiling posenc's tests and examples for aarch64 (Linux, glibc) on an x86-64 Debian or
# Ubuntu host, and running them under user-mode emulation:
#
#   apt-get install g++-aarch64-linux-gnu qemu-user
#   cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchain-aarch64-linux-gnu.cmake
#   cmake --build build/aarch64 --target posenc_tests
#   qemu-aarch64 -L /usr/aarch64-linux-gnu build/aarch64/tests/posenc_tests
#
# Eigen and Catch2 are header-only, so the host's packages (/usr/include, /usr/share/eigen3/cmake,
# /usr/lib/cmake/Catch2) serve the target too; libraries come from the target's sysroot only.
# CMAKE_CROSSCOMPILING_EMULATOR lets ctest and catch_discover_tests run target programs.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(POSENC_AARCH64_TRIPLE aarch64-linux-gnu CACHE STRING "GNU triple of the aarch64 cross toolchain")
set(POSENC_AARCH64_SYSROOT /usr/${POSENC_AARCH64_TRIPLE} CACHE PATH "aarch64 libraries (qemu's -L)")

set(CMAKE_C_COMPILER ${POSENC_AARCH64_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${POSENC_AARCH64_TRIPLE}-g++)

find_program(POSENC_QEMU_AARCH64 qemu-aarch64)
if(POSENC_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${POSENC_QEMU_AARCH64};-L;${POSENC_AARCH64_SYSROOT}")
endif()

# Programs (python3, mpiexec) from the host; libraries from the target's sysroot; headers and CMake
# package files from both (Eigen3Config.cmake and Catch2Config.cmake are architecture-independent).
set(CMAKE_FIND_ROOT_PATH ${POSENC_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
