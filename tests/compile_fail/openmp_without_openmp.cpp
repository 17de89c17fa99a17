// The OpenMP executor is opt-in and needs OpenMP: without -fopenmp its header says so.
#include "posenc/openmp.hpp"

int workers() { return posenc::openmp_executor().concurrency(); }
