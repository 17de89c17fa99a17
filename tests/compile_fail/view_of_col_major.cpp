// Eigen's default (column-major) matrix: posenc would have to copy it, and refuses at compile time.
#include "posenc/types.hpp"

posenc::index_t col_major() {
  Eigen::MatrixXf m(4, 8);
  return posenc::view_of(m).stride;
}
