// posenc: positional-encoding primitives for long-context transformers.
// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file posenc.hpp
/// Umbrella header: everything public in posenc. Projects that care about compile time may
/// include the individual headers instead (each one compiles on its own).

#include "posenc/concepts.hpp"
#include "posenc/config.hpp"
#include "posenc/types.hpp"
