// A program whose files are compiled with POSENC_EXTERN_KERNELS (README, "Compile time"). Linked
// alone it must fail, naming a kernel table it lacks; linked with tests/kernels.cpp (the file that
// defines POSENC_DEFINE_KERNELS) it must link: the positive control.
#include "posenc/attention/blockwise.hpp"

int main() {
  const posenc::row_matrix<float> q = posenc::row_matrix<float>::Ones(2, 8);
  posenc::row_matrix<float> out(2, 8);
  posenc::attention(q, q, q, out, posenc::arange(0, 2), posenc::arange(0, 2), posenc::no_position<float>{}, {});
  return out(0, 0) == 1.0f ? 0 : 1;
}
