// Views and positions: the vocabulary every encoder takes.
#include <catch2/catch.hpp>
#include <vector>

#include "posenc/concepts.hpp"
#include "posenc/types.hpp"

using posenc::index_t;

TEST_CASE("view_of wraps Eigen row-major storage in place", "[types]") {
  posenc::row_matrix<float> m(4, 10);
  auto v = posenc::view_of(m);
  CHECK(v.data == m.data());
  CHECK(v.rows == 4);
  CHECK(v.cols == 10);
  CHECK(v.stride == 10);

  // A column block of a row-major matrix keeps the parent's row stride: an engine's fused QKV
  // buffer is used in place.
  auto b = posenc::view_of(m.block(1, 3, 2, 4));
  CHECK(b.data == &m(1, 3));
  CHECK(b.rows == 2);
  CHECK(b.cols == 4);
  CHECK(b.stride == 10);
  static_assert(!std::is_const_v<std::remove_pointer_t<decltype(b.data)>>);

  const posenc::row_matrix<float>& cm = m;
  auto c = posenc::view_of(cm);
  static_assert(std::is_const_v<std::remove_pointer_t<decltype(c.data)>>);
  CHECK(c.data == m.data());

  Eigen::Map<posenc::row_matrix<double>, Eigen::Unaligned, Eigen::OuterStride<>> map(nullptr, 0, 0,
                                                                                     Eigen::OuterStride<>(7));
  std::vector<double> buf(3 * 7);
  new (&map) decltype(map)(buf.data(), 3, 5, Eigen::OuterStride<>(7));
  auto mv = posenc::view_of(map);
  CHECK(mv.stride == 7);
  CHECK(&mv(2, 4) == &buf[2 * 7 + 4]);
}

TEST_CASE("strided_view slices keep the stride", "[types]") {
  std::vector<float> buf(6 * 8);
  posenc::strided_view<float> v(buf.data(), 6, 5, 8);
  auto r = v.middle_rows(2, 3);
  CHECK(r.data == buf.data() + 16);
  CHECK(r.rows == 3);
  auto c = v.middle_cols(1, 2);
  CHECK(&c(1, 1) == &buf[8 + 2]);
  CHECK_THROWS_AS(v.middle_rows(4, 3), posenc::precondition_error);
  CHECK_THROWS_AS(v.middle_cols(4, 2), posenc::precondition_error);
  CHECK_THROWS_AS(posenc::strided_view<float>(buf.data(), 3, 8, 5), posenc::precondition_error);
}

TEST_CASE("positions as a list or a range", "[types]") {
  std::vector<posenc::position> list{7, -2, 1LL << 40, 3};
  posenc::positions p(list);
  CHECK(p.size() == 4);
  CHECK_FALSE(p.is_range());
  CHECK(p[2] == (1LL << 40));
  auto s = p.subset(1, 2);
  CHECK(s.size() == 2);
  CHECK(s[0] == -2);

  auto r = posenc::arange(100, 5);
  CHECK(r.is_range());
  CHECK(r[4] == 104);
  CHECK(r.subset(2, 3)[0] == 102);
  CHECK_THROWS_AS(r.subset(3, 3), posenc::precondition_error);
}

TEST_CASE("no_position satisfies the concept and no refinement", "[concepts]") {
  static_assert(posenc::positional_encoding<posenc::no_position<float>>);
  static_assert(posenc::positional_encoding<posenc::no_position<double>>);
  static_assert(!posenc::rotation<posenc::no_position<float>>);
  static_assert(!posenc::additive_input<posenc::no_position<float>>);
  static_assert(!posenc::score_bias<posenc::no_position<float>>);
  CHECK(posenc::no_position<float>{}.name() == "none");
}
