# cmake -DINCLUDE_DIR=<dir> -P lint_headers.cmake
# Fails, naming the file, when a library header breaks an include rule the compiler cannot see:
# no <iostream> (a static initialiser in every user translation unit) and no <Eigen/Dense>
# (all of Eigen's decompositions; include <Eigen/Core> plus the one module needed); no OpenMP
# (`#pragma omp`, <omp.h>, `_OPENMP`) outside posenc/openmp.hpp, the opt-in executor, so that a
# translation unit compiled with -fopenmp and one without compile the same inline functions.
file(GLOB_RECURSE headers RELATIVE "${INCLUDE_DIR}" "${INCLUDE_DIR}/posenc/*.hpp")
set(failures 0)
foreach(header IN LISTS headers)
  file(STRINGS "${INCLUDE_DIR}/${header}" includes REGEX "^[ \t]*#[ \t]*include")
  foreach(line IN LISTS includes)
    if(line MATCHES "<(iostream|Eigen/Dense)>")
      message(SEND_ERROR "${header}: `${line}`: library headers must not include <${CMAKE_MATCH_1}>")
      math(EXPR failures "${failures} + 1")
    endif()
  endforeach()
  if(NOT header STREQUAL "posenc/openmp.hpp")
    file(STRINGS "${INCLUDE_DIR}/${header}" omp REGEX "#[ \t]*pragma[ \t]+omp|<omp\\.h>|_OPENMP")
    foreach(line IN LISTS omp)
      message(SEND_ERROR "${header}: `${line}`: OpenMP belongs in posenc/openmp.hpp only")
      math(EXPR failures "${failures} + 1")
    endforeach()
  endif()
endforeach()
list(LENGTH headers n)
if(failures)
  message(FATAL_ERROR "${failures} forbidden include(s) in ${n} headers")
endif()
message(STATUS "${n} headers checked: no <iostream>, no <Eigen/Dense>, OpenMP only in posenc/openmp.hpp")
