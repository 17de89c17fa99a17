// posenc's check cannot be replaced by a user macro (an abort in one translation unit and an
// exception in another would be two definitions of the same inline functions).
#define POSENC_ASSERT(cond, ...) ((void)0)
#include "posenc/types.hpp"

posenc::index_t rows_of(const posenc::strided_view<float>& v) { return v.rows; }
