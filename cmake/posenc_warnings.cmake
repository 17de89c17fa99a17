# Warning flags for posenc's own tests, benchmarks and examples, on a private target; nothing
# here reaches users of posenc::posenc.
add_library(posenc_warnings INTERFACE)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(posenc_warnings INTERFACE -Wall -Wextra -Wpedantic -Wshadow -Wconversion
                                                   -Wno-sign-conversion)
  if(POSENC_WERROR)
    target_compile_options(posenc_warnings INTERFACE -Werror)
  endif()
endif()
