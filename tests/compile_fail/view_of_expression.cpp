// An unevaluated expression has no memory to view.
#include "posenc/types.hpp"

posenc::index_t expression() {
  posenc::row_matrix<float> m(4, 8);
  return posenc::view_of(m + m).stride;
}
