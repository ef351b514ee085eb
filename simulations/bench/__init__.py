"""`fedskin bench`: performance figures of the training stack, measured side by side.

Why a script and not timed tests: absolute times depend on the machine and its load, so the
useful figures are *ratios* of two things measured in the same run, on the same device,
interleaved (A B A B ...) so that background load hits both alike. Six sections:

1. local training throughput of the client code (``train_local``) against a plain PyTorch
   loop over the same tensors (same model, optimizer, batch size; augmentation off in both);
2. data pipeline: gathering batches from the uint8 cache against decoding the JPEGs every
   epoch through a naive Dataset/DataLoader;
3. round overhead of a real (Flower Simulation Engine) run: round wall time against the
   clients' own training time, from the run's metrics.json;
4. DP-SGD cost: DP step against non-DP step, per backbone and per grad-sample mode;
5. scaling with the number of sites over the same total data (measured in-process: a loop
   over sites calling ``train_local`` with one reused model, as a simulated client does).
6. the cost of SecAgg+ (only with ``--sections 6``): the same simulated round plain and
   under ``secure-aggregation = "secagg+"``, for 4, 6 and 24 sites and two models.

Every figure is printed as a rich table and returned as a dict (``--out`` writes it as JSON,
``--markdown`` appends a dated Markdown block).

One module per part: ``settings`` (what a run depends on), ``measure`` and ``memory`` (timing,
tables, /proc memory figures and the Ray actor sampler thread), one module per section
(``train``, ``pipeline``, ``rounds``, ``dp``, ``scaling``, ``secagg``), ``driver`` (runs the chosen
sections, writes the Markdown block) and ``cli`` (``fedskin bench``).
"""

from simulations.bench.cli import bench_cli
from simulations.bench.dp import bench_dp
from simulations.bench.driver import header, markdown_block, parse_sections, run_bench
from simulations.bench.measure import SectionTable
from simulations.bench.pipeline import bench_pipeline
from simulations.bench.rounds import bench_round, bench_server_writes
from simulations.bench.scaling import bench_scaling
from simulations.bench.secagg import bench_secagg
from simulations.bench.settings import (
    DP_MODES,
    NUM_CLASSES,
    SECTION_NAMES,
    SIGNED_FIGURES,
    TARGETS,
    BenchSettings,
    make_settings,
    resolve_device,
)
from simulations.bench.train import PlainLoop, bench_train

__all__ = [
    "DP_MODES",
    "NUM_CLASSES",
    "SECTION_NAMES",
    "SIGNED_FIGURES",
    "TARGETS",
    "BenchSettings",
    "PlainLoop",
    "SectionTable",
    "bench_cli",
    "bench_dp",
    "bench_pipeline",
    "bench_round",
    "bench_scaling",
    "bench_secagg",
    "bench_server_writes",
    "bench_train",
    "header",
    "make_settings",
    "markdown_block",
    "parse_sections",
    "resolve_device",
    "run_bench",
]
