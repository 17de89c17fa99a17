# One documentation snippet's test (tests/snippets/CMakeLists.txt):
#   cmake -DWHERE=<file.md:line> [-DBUILD_DIR=<dir> -DTARGET=<target> -DCONFIG=<config> [-DJOBS=<n>]]
#         [-DMODE=run|compile-only|prebuild -DREASON=<why>] [-DRUN=<program> [-DINTERPRETER=<python>]]
#         -P run_snippet.cmake
# Builds TARGET when given (a C++ snippet's executable; JOBS compile jobs); fails with the
# compiler's output when it does not build. Then, in MODE run, runs RUN (with INTERPRETER when
# given) and fails when it exits non-zero; in MODE compile-only it reports REASON instead of
# running. MODE prebuild only builds, and passes whether or not TARGET built (snippet.build_all:
# a snippet that did not build fails its own test, with its compiler messages).
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
  if(NOT rc EQUAL 0 AND NOT MODE STREQUAL "prebuild")
    message(FATAL_ERROR "${WHERE}: building ${TARGET} failed (${rc}):\n${out}")
  elseif(NOT rc EQUAL 0)
    message(STATUS "${WHERE}: not every target built (${rc}); their own tests say which")
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
