"""The machine a benchmark runs on: its CPU, its widest fp32 FMA unit and that unit's measured peak.

"% of peak" is only honest against the widest FMA the host has: a 256-bit loop reports about
half of an AVX-512 core's peak (measured on an Intel AVX-512 host: 125 vs 200-227 GFLOP/s per
core), so every benchmark takes the peak from here. The peak is measured, not computed from
datasheet clocks, by a small C loop with enough independent accumulator chains to cover the FMA
latency on every port (Intel/AMD: 2 ports x 4-5 cycles; Cortex-A76: 2 x 4), compiled for the
widest ISA the host reports.

    .venv/bin/python -m benchmarks.machine [--threads 1 2] [--loads]

``--loads`` also times FMAs whose addend is a vector load from L1 at each float offset from a
64-byte line: on Zen 3 a 256-bit load that splits a line costs about two load slots (aligned
5.6-6.2 G vector FMAs/s, 89-99% of peak; offsets 1-7 3.2-3.9 G/s), which is why the pattern
conv lifts its rows (docs/performance.md, "The pattern conv with aligned loads").
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from tvm_patdnn.targets import runtime_threads

__all__ = ["add_peak_percent", "cpu_name", "cpu_peak_gflops", "fma_load_gflops", "fma_peak_gflops", "machine_summary",
           "tvm_threads", "widest_isa"]

# ISA -> (fp32 lanes, independent accumulator chains, gcc flags, header, vector type, set1,
# fma(acc, a, b), reduce-to-float). Chains: more than FMA ports x latency (2 x 4-5 cycles on Intel,
# AMD and Cortex-A76) and, with the two operands, fewer than the vector registers (AVX2 has 16,
# AVX-512 and aarch64 32): a chain that spills measures the stack, not the FMA units.
_ISAS = {
    "avx512": (16, 24, ["-mavx512f", "-mfma"], "immintrin.h", "__m512", "_mm512_set1_ps({})",
               "_mm512_fmadd_ps({0}, {1}, {2})", "_mm512_reduce_add_ps({})"),
    "avx2": (8, 12, ["-mavx2", "-mfma"], "immintrin.h", "__m256", "_mm256_set1_ps({})",
             "_mm256_fmadd_ps({0}, {1}, {2})", "hsum256({})"),
    "neon": (4, 24, [], "arm_neon.h", "float32x4_t", "vdupq_n_f32({})", "vfmaq_f32({2}, {0}, {1})",
             "vaddvq_f32({})"),
}

# ISA -> (unaligned vector load, vector store) for the loaded-addend loop.
_LOADS = {"avx512": ("_mm512_loadu_ps({})", "_mm512_storeu_ps"), "avx2": ("_mm256_loadu_ps({})", "_mm256_storeu_ps"),
          "neon": ("vld1q_f32({})", "vst1q_f32")}

_HELPERS = """
#ifdef __AVX2__
static float hsum256(__m256 v) { float o[8]; _mm256_storeu_ps(o, v); return o[0]+o[1]+o[2]+o[3]+o[4]+o[5]+o[6]+o[7]; }
#endif
"""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def widest_isa() -> str:
    """The widest fp32 FMA ISA of this CPU: ``avx512``, ``avx2``, ``neon`` (aarch64)."""
    if platform.machine() in ("aarch64", "arm64"):
        return "neon"
    flags = _cpu_flags()
    if "avx512f" in flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    raise RuntimeError("this CPU has neither AVX2+FMA nor AVX-512 nor NEON: no FMA peak to measure")


def cpu_name() -> str:
    """The model name ``lscpu`` shows (e.g. ``AMD EPYC``, ``Intel(R) Xeon(R) Platinum 8481C``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _source(isa: str) -> str:
    lanes, chains, _flags, header, vec, set1, fma, reduce = _ISAS[isa]
    declare = ", ".join(f"c{i} = {set1.format(f's0 + {i}')}" for i in range(chains))
    body = " ".join(f"c{i} = {fma.format(f'c{i}', 'a', 'b')};" for i in range(chains))
    total = " + ".join(reduce.format(f"c{i}") for i in range(chains))
    # Distinct run-time starting values: identical chains get merged by the compiler into one
    # (seen once: a single vfmadd in the loop and a "peak" 1.5x above the real one).
    return f"""
#include <{header}>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
{_HELPERS}
int main(int argc, char **argv) {{
    long iters = atol(argv[1]); int threads = atoi(argv[2]); float sink = 0.f;
    double t0 = omp_get_wtime();
    #pragma omp parallel num_threads(threads) reduction(+:sink)
    {{
        {vec} a = {set1.format('0.999f')}, b = {set1.format('1e-4f')};
        float s0 = (float)argc * 1e-3f;
        {vec} {declare};
        for (long i = 0; i < iters; ++i) {{ {body} }}
        sink += {total};
    }}
    double seconds = omp_get_wtime() - t0;
    printf("%f %f\\n", 2.0 * {lanes} * {chains} * (double)iters * threads / seconds / 1e9, sink);
    return 0;
}}
"""


def _load_source(isa: str) -> str:
    """Each chain's FMA takes its addend from memory: the next vector of a 64-byte-aligned L1 buffer
    shifted by ``argv[2]`` floats, so every offset that is not a multiple of the lanes makes loads
    that split cache lines."""
    lanes, chains, _flags, header, vec, set1, fma, _reduce = _ISAS[isa]
    load, store = _LOADS[isa]
    declare = ", ".join(f"c{i} = {set1.format(f's0 + {i}')}" for i in range(chains))
    body = " ".join(f"c{i} = {fma.format(f'c{i}', 'w', load.format(f'p + {i * lanes}'))};" for i in range(chains))
    chunk = chains * lanes
    return f"""
#include <{header}>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {{
    long iters = atol(argv[1]); int offset = atoi(argv[2]);
    float *buffer = aligned_alloc(64, sizeof(float) * ({32 * chunk} + 64));
    for (int i = 0; i < {32 * chunk} + 64; ++i) buffer[i] = 1e-3f * (i % 7);
    float s0 = (float)argc * 1e-3f, sink = 0.f, lanes[{lanes}];
    {vec} w = {set1.format('0.999f')}, {declare};
    double t0 = omp_get_wtime();
    for (long i = 0; i < iters; ++i) {{ const float *p = buffer + (i & 31) * {chunk} + offset; {body} }}
    double seconds = omp_get_wtime() - t0;
    {"".join(f"{store}(lanes, c{i}); sink += lanes[0];" for i in range(chains))}
    printf("%f %f\\n", 2.0 * {lanes} * {chains} * (double)iters / seconds / 1e9, sink);
    return 0;
}}
"""


def fma_load_gflops(isa: str | None = None, runs: int = 3) -> dict[int, float]:
    """GFLOP/s of one thread's FMAs with a loaded addend, per float offset 0..lanes from a line."""
    isa = isa or widest_isa()
    with tempfile.TemporaryDirectory(prefix="patdnn-loads-") as scratch:
        binary = _compile(isa, Path(scratch), loads=True)
        return {offset: max(float(subprocess.run([str(binary), "50000000", str(offset)], capture_output=True,
                                                 text=True, check=True).stdout.split()[0]) for _ in range(runs))
                for offset in range(_ISAS[isa][0] + 1)}


def _compile(isa: str, workdir: Path, loads: bool = False) -> Path:
    binary = workdir / f"fma_{'loads' if loads else 'peak'}_{isa}"
    if not binary.exists():
        source = binary.with_suffix(".c")
        source.write_text(_load_source(isa) if loads else _source(isa))
        subprocess.run(["gcc", "-O2", *_ISAS[isa][2], "-fopenmp", str(source), "-o", str(binary)], check=True)
    return binary


def fma_peak_gflops(threads: int, workdir: Path | None = None, isa: str | None = None) -> float:
    """fp32 FMA peak of ``threads`` cores with the widest ISA (or ``isa``): best of 5 runs.
    The loop is built in ``workdir`` (kept for the next call) or in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="patdnn-peak-") as scratch:
        binary = _compile(isa or widest_isa(), Path(workdir or scratch))
        runs = [float(subprocess.run([str(binary), "100000000", str(threads)], capture_output=True, text=True,
                                     check=True).stdout.split()[0]) for _ in range(5)]
    return max(runs)


def cpu_peak_gflops(runs: int = 5) -> float:
    """The widest-ISA FMA loop on one thread, rated by its CPU time instead of wall time (for layers
    timed in CPU time, ``runtimes.cpu_ms``: a second process on the core halves wall rates)."""
    with tempfile.TemporaryDirectory(prefix="patdnn-peak-") as scratch:
        binary = _compile(widest_isa(), Path(scratch))
        best = 0.0
        for _ in range(runs):
            before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            rate = float(subprocess.run([str(binary), "100000000", "1"], capture_output=True, text=True,
                                        check=True).stdout.split()[0])
            wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            best = max(best, rate * wall / cpu)
    return best


def tvm_threads() -> int:
    """The threads TVM's runtime runs with here (``TVM_NUM_THREADS``, read when the runtime starts,
    else TVM's default: half the x86 CPUs), which is also what the ``x86`` target compiles for."""
    return runtime_threads()


def add_peak_percent(rows: list[dict], peak_before: float) -> float:
    """Give every row its ``nonzero_peak_percent``; returns the peak used: the better of the FMA
    peak measured before the rows and now (on a shared box the FMA loop too can lose its core)."""
    peak = max(peak_before, fma_peak_gflops(tvm_threads()))
    for row in rows:
        row["nonzero_peak_percent"] = 100 * row["nonzero_gflops"] / peak
    return peak


def machine_summary(threads: list[int], workdir: Path | None = None) -> dict:
    """What a results file records about the machine: CPU, ISA, peak per thread count."""
    isa = widest_isa()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "fma_isa": isa,
            "fma_peak_gflops": {str(t): fma_peak_gflops(t, workdir, isa) for t in threads}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--loads", action="store_true",
                        help="also time FMAs with a loaded addend at each float offset from a cache line (1 thread)")
    args = parser.parse_args()
    summary = machine_summary(args.threads)
    print(f"{summary['cpu']}, {summary['cores']} cores, widest FMA: {summary['fma_isa']}")
    for threads, peak in summary["fma_peak_gflops"].items():
        print(f"fp32 FMA peak, {threads} thread(s): {peak:.1f} GFLOP/s")
    if summary["fma_isa"] == "avx512":  # the 256-bit peak for comparison: AVX2 builds are held to it
        print(f"(256-bit loop, 1 thread: {fma_peak_gflops(1, isa='avx2'):.1f} GFLOP/s)")
    if args.loads:
        rates = fma_load_gflops(summary["fma_isa"])
        print("FMA with a loaded addend, 1 thread, GFLOP/s by float offset from a 64-byte line: "
              + ", ".join(f"{offset}: {rate:.1f}" for offset, rate in rates.items()))


if __name__ == "__main__":
    main()
