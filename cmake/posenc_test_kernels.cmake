# posenc_add_kernels(NAME [compile options]): an object library of tests/kernels.cpp, the SIMD kernel
# tables compiled once (POSENC_DEFINE_KERNELS) for the test programs that link it; it gives them
# POSENC_EXTERN_KERNELS (README, "Compile time"). Used by tests/ and tests/fuzz/.
include_guard(GLOBAL)
function(posenc_add_kernels name)
  add_library(${name} OBJECT "${PROJECT_SOURCE_DIR}/tests/kernels.cpp")
  target_link_libraries(${name} PUBLIC posenc::posenc)
  if(TARGET posenc_warnings)
    target_link_libraries(${name} PRIVATE posenc_warnings)
  endif()
  target_compile_options(${name} PRIVATE ${ARGN})
  target_compile_definitions(${name} INTERFACE POSENC_EXTERN_KERNELS)
endfunction()
