# Runs one libFuzzer target for a bounded time (cmake -P; see CMakeLists.txt):
#   -DFUZZER=<executable> -DCORPUS=<seed corpus> -DWORK=<scratch dir> -DSECONDS=<n> -DMAX_LEN=<bytes>
# The seeds are copied into WORK first: libFuzzer adds the inputs it finds to its corpus
# directory, and the source tree must stay untouched. Prints libFuzzer's "Done N runs" line.
foreach(_var FUZZER CORPUS WORK SECONDS MAX_LEN)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "run_fuzzer.cmake: -D${_var}=... is required")
  endif()
endforeach()
if(NOT IS_DIRECTORY "${CORPUS}")
  message(FATAL_ERROR "run_fuzzer.cmake: no seed corpus at ${CORPUS}")
endif()

file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}/corpus" "${WORK}/artifacts")
file(GLOB _seeds "${CORPUS}/*")
file(COPY ${_seeds} DESTINATION "${WORK}/corpus")

# -timeout: one input may take at most 30 s; -rss_limit_mb: the process at most 2 GiB (and one
# allocation at most that much).
execute_process(
  COMMAND "${FUZZER}" -max_total_time=${SECONDS} -max_len=${MAX_LEN} -timeout=30 -rss_limit_mb=2048
          -print_final_stats=1 "-artifact_prefix=${WORK}/artifacts/" "${WORK}/corpus"
  WORKING_DIRECTORY "${WORK}"
  RESULT_VARIABLE _rc
  OUTPUT_VARIABLE _out
  ERROR_VARIABLE _out)
file(WRITE "${WORK}/log.txt" "${_out}")

get_filename_component(_name "${FUZZER}" NAME)
string(REGEX MATCH "Done [0-9]+ runs in [0-9]+ second" _done "${_out}")
string(REGEX MATCH "stat::number_of_executed_units: [0-9]+" _units "${_out}")
if(NOT _rc EQUAL 0)
  string(LENGTH "${_out}" _n)
  if(_n GREATER 12000)
    math(EXPR _from "${_n} - 12000")
    string(SUBSTRING "${_out}" ${_from} -1 _out)
  endif()
  message("${_out}")
  message(FATAL_ERROR "${_name}: finding (exit code ${_rc}); the input is in ${WORK}/artifacts, the log in ${WORK}/log.txt")
endif()
message("${_name}: ${_done}(s) [${_units}], seeds from ${CORPUS}")
