// posenc: positional-encoding primitives for long-context transformers.
// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file posenc.hpp
/// Umbrella header: everything public in posenc. Projects that care about compile time may
/// include the individual headers instead (each one compiles on its own).

#include "posenc/config.hpp"
#include "posenc/executor.hpp"
#include "posenc/simd.hpp"
#include "posenc/types.hpp"
#include "posenc/concepts.hpp"

#include "posenc/encoders/sinusoidal.hpp"
#include "posenc/encoders/rope_scaling.hpp"
#include "posenc/encoders/hf_config.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/mrope.hpp"
#include "posenc/encoders/temperature.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "posenc/encoders/shaw.hpp"

#include "posenc/attention/params.hpp"
#include "posenc/attention/workspace.hpp"
#include "posenc/attention/reference.hpp"
#include "posenc/attention/blockwise.hpp"
#include "posenc/attention/merge.hpp"
#include "posenc/attention/batch.hpp"
#include "posenc/attention/backward.hpp"
#include "posenc/encoders/layer_config.hpp"

// Ring attention's schedule and simulator. The MPI driver, posenc/distributed/mpi_ring.hpp, needs
// <mpi.h> and is included on its own.
#include "posenc/distributed/ring.hpp"
#include "posenc/distributed/ring_backward.hpp"
