"""Benchmarks of tvm_patdnn, run from the repository root as modules: ``python -m benchmarks.peers``.

``models`` builds every benchmark model (dense and pruned twins), ``runtimes`` runs and times
tvm_patdnn and its peers and checks that they agree, ``machine`` measures the host's FMA peak;
each other module is one benchmark with its own command line.
"""

from tvm_patdnn.targets import keep_cpu_pinning

# Every benchmark is meant to be pinned (`taskset -c 1`): keep that pinning when TVM's pool starts.
keep_cpu_pinning()
