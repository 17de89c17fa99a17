// Turning the checks off per translation unit would give inline functions two definitions in one
// program (the one-definition rule): the old opt-out macro is an error with an explanation.
#define POSENC_NO_ASSERT
#include "posenc/types.hpp"

posenc::index_t rows_of(const posenc::strided_view<float>& v) { return v.rows; }
