// Integer elements are not a storage type posenc computes with.
#include "posenc/types.hpp"

posenc::index_t int_elements() {
  Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> m(4, 8);
  return posenc::view_of(m).stride;
}
