# cmake -DBUILD_DIR=<dir> -DPREFIX=<dir> -DCONFIG=<config> -P install_prefix.cmake
# Installs the build tree into a fresh PREFIX, so files removed from posenc do not linger there.
file(REMOVE_RECURSE "${PREFIX}")
set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${config_args}
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${rc})")
endif()
