# One documentation snippet's test (tests/snippets/CMakeLists.txt):
#   cmake -DBUILD_DIR=<dir> -DTARGET=<target> -DCONFIG=<config> -DWHERE=<file.md:line>
#         [-DMODE=run|compile-only|prebuild -DREASON=<why>] [-DRUN=<program> [-DINTERPRETER=<python>]]
#         [-DJOBS=<n>] -P run_snippet.cmake
# Builds TARGET (the snippet's executable, or the Python module); fails with the compiler's output
# when it does not build. Then, in MODE run, runs RUN (with INTERPRETER when given) and fails when
# it exits non-zero; in MODE compile-only it reports REASON instead of running.
message(STATUS "snippet ${WHERE}")
set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
if(JOBS)
  list(APPEND config_args --parallel ${JOBS})
endif()
if(TARGET)
  execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BUILD_DIR}" --target "${TARGET}" ${config_args}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0 AND MODE STREQUAL "prebuild")
    # The snippets that failed fail their own tests, each with its compiler messages.
    message(STATUS "${WHERE}: not every snippet built (${rc}); their own tests say which")
    return()
  elseif(NOT rc EQUAL 0)
    message(FATAL_ERROR "${WHERE}: building ${TARGET} failed (${rc}):\n${out}")
  endif()
endif()
if(MODE STREQUAL "prebuild")
  return()
endif()
if(MODE STREQUAL "compile-only")
  if(INTERPRETER)
    execute_process(COMMAND "${INTERPRETER}" -c "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])"
                            "${RUN}" RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "${WHERE}: the snippet is not valid Python")
    endif()
  endif()
  message(STATUS "${WHERE}: compiled, not run: ${REASON}")
  return()
endif()
if(RUN)
  execute_process(COMMAND ${INTERPRETER} "${RUN}" RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${WHERE}: the snippet failed (exit status ${rc})")
  endif()
endif()
