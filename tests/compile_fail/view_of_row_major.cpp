// Positive control for the view_of cases: a row-major matrix, built exactly like them, compiles.
#include "posenc/types.hpp"

posenc::index_t control() {
  posenc::row_matrix<float> m(4, 8);
  return posenc::view_of(m).stride;
}
