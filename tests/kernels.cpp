// The SIMD kernel tables of the test programs, compiled here once: every test file is compiled
// with POSENC_EXTERN_KERNELS and sees only their declarations (README, "Compile time").
// Under the sanitizers each file that calls attention took 100-280 s to compile, most of it these
// kernels; without them 9-97 s (docs/isa.md, "Compile time").
#define POSENC_DEFINE_KERNELS
#include "posenc/detail/attention_kernels.hpp"
