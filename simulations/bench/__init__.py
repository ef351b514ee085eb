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
