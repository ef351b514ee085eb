"""fedskin's test suite.

Before anything imports torch, the suite pins the CPU numerics that differ between x86-64
machines (measured: each of these alone changes a training step's weights, bit for bit):
torch's own kernels (``ATEN_CPU_CAPABILITY``: the portable ``default`` set, which every
x86-64 CPU runs), oneDNN's convolutions (``ONEDNN_MAX_CPU_ISA``) and MKL's BLAS
(``MKL_CBWR``, MKL's conditional numerical reproducibility) capped at AVX2 where the CPU has
it, and one thread per process (``OMP_NUM_THREADS``; Ray's workers and the SuperNodes the
tests start inherit all four). An AVX-512 machine then computes as an AVX2 one does. What
is left (oneDNN's blocking by cache size) is covered by the golden run's tolerances
(tests/test_simulation.py). A value set in the environment wins: ``ATEN_CPU_CAPABILITY=avx2
pytest ...`` checks the suite under other kernels.

Ray starts its workers (the simulations' ClientApp actors) at niceness 15 so that its own
daemons come first (``RAY_worker_niceness``). In the suite, every pytest-xdist worker's
processes (drivers, the real SuperLinks and SuperNodes, in-process training) run at 0, so
one worker's CPU-bound test starves the other worker's simulation actors, which then hold
their whole test up. The suite's Ray workers run at 0 (the Ray heads and local Rays the
tests start inherit it), as processes of the same run should.
"""

import os
from pathlib import Path


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


os.environ.setdefault("ATEN_CPU_CAPABILITY", "default")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_worker_niceness", "0")
if {"avx2", "fma"} <= _cpu_flags():
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    os.environ.setdefault("MKL_CBWR", "AVX2")
