# cmake -DSOURCE_DIR=<posenc> -DBINARY_DIR=<dir> -DPREFIX=<dir> -DCONSUMER_DIR=<find_package consumer>
#       -DCONFIG=<config> -DCTEST=<ctest> -DGENERATOR=<generator> -DCXX_COMPILER=<c++> "-DCXX_FLAGS=<flags>"
#       -DEigen3_DIR=<dir> -P install_minimal.cmake
# Configures posenc as a user who only wants to install it would: no option given, and every
# optional framework made unfindable (CMAKE_DISABLE_FIND_PACKAGE_<name>), so that only CMake and
# Eigen are there. Then installs it and builds and runs the find_package consumer against it.
file(REMOVE_RECURSE "${BINARY_DIR}" "${PREFIX}")
set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()

function(run step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${step} failed (${rc}): ${ARGN}\n${out}")
  endif()
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

set(hidden)
foreach(pkg Catch2 benchmark MPI Python3 pybind11 OpenMP)
  list(APPEND hidden "-DCMAKE_DISABLE_FIND_PACKAGE_${pkg}=ON")
endforeach()
run(configure "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}"
    "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}" "-DCMAKE_BUILD_TYPE=${CONFIG}"
    "-DEigen3_DIR=${Eigen3_DIR}" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF ${hidden})
foreach(skipped "tests not built: Catch2" "benchmarks not built: Google Benchmark")
  if(NOT last_output MATCHES "${skipped}")
    message(FATAL_ERROR "configure did not say \"${skipped}\":\n${last_output}")
  endif()
endforeach()
run(install "${CMAKE_COMMAND}" --install "${BINARY_DIR}" --prefix "${PREFIX}" ${config_args})
if(NOT EXISTS "${PREFIX}/include/posenc/posenc.hpp")
  message(FATAL_ERROR "the install into ${PREFIX} holds no posenc/posenc.hpp")
endif()
file(GLOB_RECURSE config_file "${PREFIX}/*/posencConfig.cmake")
get_filename_component(config_dir "${config_file}" DIRECTORY)
run(consumer "${CMAKE_COMMAND}" "-DSOURCE_DIR=${CONSUMER_DIR}" "-DBINARY_DIR=${BINARY_DIR}/consumer" "-DCONFIG=${CONFIG}"
    "-DCTEST=${CTEST}" "-DGENERATOR=${GENERATOR}" "-DCXX_COMPILER=${CXX_COMPILER}" "-DCXX_FLAGS=${CXX_FLAGS}"
    "-DEigen3_DIR=${Eigen3_DIR}"
    "-DARGS=-DCMAKE_PREFIX_PATH=${PREFIX},-DEXPECT_POSENC_DIR=${config_dir},-DEXPECT_INCLUDE_DIR=${PREFIX}/include"
    -P "${CMAKE_CURRENT_LIST_DIR}/build_consumer.cmake")
message(STATUS "installed with CMake and Eigen only into ${PREFIX}; the find_package consumer builds and runs")
