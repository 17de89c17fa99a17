# cmake -DSOURCE_DIR=<consumer project> -DBINARY_DIR=<dir> -DCONFIG=<config> -DCTEST=<ctest>
#       -DGENERATOR=<generator> -DCXX_COMPILER=<c++> "-DCXX_FLAGS=<flags>" -DEigen3_DIR=<dir>
#       [-DARGS=<-Dvar=value,...>] -P build_consumer.cmake
# Configures a consumer project from scratch with the compiler and flags of the enclosing build,
# builds it, and runs its tests. ARGS is a comma-separated list of extra cache settings.
file(REMOVE_RECURSE "${BINARY_DIR}")
string(REPLACE "," ";" extra_args "${ARGS}")
set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()

function(run step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer ${step} failed (${rc}): ${ARGN}")
  endif()
endfunction()

run(configure "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}"
    "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}" "-DCMAKE_BUILD_TYPE=${CONFIG}"
    "-DEigen3_DIR=${Eigen3_DIR}" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF ${extra_args})
run(build "${CMAKE_COMMAND}" --build "${BINARY_DIR}" ${config_args})
run(test "${CTEST}" --test-dir "${BINARY_DIR}" ${config_args} --output-on-failure --no-tests=error)
