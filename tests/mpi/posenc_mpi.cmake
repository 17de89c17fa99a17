# Helpers for posenc's MPI programs (tests, the ring example, the ring benchmark).

# Compile settings of a program that includes posenc/distributed/mpi_ring.hpp: only MPI's C API is
# used, so Open MPI's and MPICH's deprecated C++ bindings (which do not build warning-free) stay out.
function(posenc_mpi_target target)
  target_compile_definitions(${target} PRIVATE OMPI_SKIP_MPICXX=1 MPICH_SKIP_MPICXX=1)
endfunction()

# posenc_add_mpi_test(NAME NP COMMAND...): a ctest test that runs COMMAND under mpirun with NP
# ranks, in the environment a non-interactive run needs on a small machine or in a container:
# root allowed, more ranks than cores, local launch without ssh, shared memory only, loopback for
# the runtime, no core binding, waiting ranks yield the CPU, one OpenMP thread per rank.
function(posenc_add_mpi_test name np)
  add_test(NAME ${name}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np} ${MPIEXEC_PREFLAGS} ${ARGN} ${MPIEXEC_POSTFLAGS})
  set(env
      OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
      OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_plm=isolated
      OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
      OMPI_MCA_oob_tcp_if_include=lo OMPI_MCA_hwloc_base_binding_policy=none OMPI_MCA_mpi_yield_when_idle=1
      PMIX_MCA_gds=hash OMP_NUM_THREADS=1)
  set_tests_properties(${name} PROPERTIES ENVIRONMENT "${env}" LABELS mpi PROCESSORS ${np})
  # Open MPI does not free what MPI_Init allocates (hundreds of small blocks per rank), so
  # LeakSanitizer fails every MPI program in a sanitizer build. Leak checking is turned off for
  # these tests only; the address and undefined-behaviour checks stay on, and posenc's own code
  # is leak-checked through the simulator tests in posenc_tests.
  set_property(TEST ${name} PROPERTY ENVIRONMENT_MODIFICATION "ASAN_OPTIONS=string_append::detect_leaks=0")
endfunction()
