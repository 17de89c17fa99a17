# cmake -DBUILD_DIR=<dir> -DTARGET=<target> -DCONFIG=<config> -DEXPECT=<regex or "compiles"> -P expect_build.cmake
# EXPECT=compiles: the target must build. Otherwise the build must fail with output matching EXPECT,
# so the test passes only for the intended reason, not for an unrelated error.
set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BUILD_DIR}" --target "${TARGET}" ${config_args}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(EXPECT STREQUAL "compiles")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${TARGET} should compile but failed (${rc}):\n${out}")
  endif()
  message(STATUS "${TARGET} compiles, as expected")
elseif(rc EQUAL 0)
  message(FATAL_ERROR "${TARGET} should not compile, but it did:\n${out}")
elseif(NOT out MATCHES "${EXPECT}")
  message(FATAL_ERROR "${TARGET} failed to compile, but without the expected message \"${EXPECT}\":\n${out}")
else()
  message(STATUS "${TARGET} fails to compile with \"${EXPECT}\", as expected")
endif()
