"""4. DP-SGD cost: DP step against non-DP step, per backbone and grad-sample mode."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from rich.console import Console
from torch import nn

from simulations.bench.measure import SectionTable, fake_data, fmt, median, timed
from simulations.bench.settings import NUM_CLASSES, TARGETS, BenchSettings


def bench_dp(s: BenchSettings, console: Console) -> tuple[dict[str, Any], SectionTable]:
    """DP-SGD step against a plain step of the same (GroupNorm) model, per mode."""
    from common.models import build_model
    from common.privacy import DPConfig, DPSession
    from common.train import TrainConfig, train_local

    device = torch.device(s.device)
    bs = s.dp_batch_size or s.batch_size
    n = bs * s.dp_steps
    images, labels = fake_data(n, s.image_size, seed=1)
    cfg = TrainConfig(batch_size=bs, local_steps=s.dp_steps, loss="ce", augment=False)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for name in s.dp_models:
        model = build_model(name, NUM_CLASSES, dp=True)

        def step(dp_mode: str | None, steps: int, model: nn.Module = model) -> float:
            session = None
            if dp_mode is not None:
                dcfg = DPConfig(noise_multiplier=1.0, physical_batch=bs, grad_sample_mode=dp_mode)
                session = DPSession(dcfg, n, bs, steps)
            c = replace(cfg, local_steps=steps)
            secs, _ = timed(
                lambda: train_local(
                    model, images, labels, c, num_classes=NUM_CLASSES, device=device, dp=session
                ),
                device,
            )
            return secs / steps

        warm = max(1, min(s.warmup, 2))
        step(None, warm)
        for mode in s.dp_modes:
            console.log(f"[4] DP cost: {name}, grad-sample mode {mode}")
            try:
                step(mode, warm)
                plain_t, dp_t = [], []
                for r in range(s.repeats):
                    pair = [(plain_t, None), (dp_t, mode)]
                    for bucket, m in pair if r % 2 == 0 else pair[::-1]:
                        bucket.append(step(m, s.dp_steps))
            except (RuntimeError, NotImplementedError, ValueError) as exc:  # e.g. OOM
                errors.append({"model": name, "mode": mode, "error": str(exc).split("\n")[0][:200]})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "dp_step_seconds": median(dp_t),
                    "nondp_step_seconds": median(plain_t),
                    "ratio": median(dp_t) / median(plain_t),
                }
            )
        del model
    table = SectionTable(
        f"4. DP-SGD cost at {s.image_size} px, batch {bs} (Poisson, expected), "
        f"median of {s.repeats}",
        ["backbone (dp=True)", "grad-sample mode", "non-DP step ms", "DP step ms", "DP / non-DP"],
    )
    for r in rows:
        table.rows.append(
            [
                r["model"],
                r["mode"],
                fmt(r["nondp_step_seconds"] * 1000),
                fmt(r["dp_step_seconds"] * 1000),
                f"{r['ratio']:.2f}",
            ]
        )
    for e in errors:
        table.rows.append([e["model"], e["mode"], "-", "failed", e["error"][:60]])
    table.notes.append(
        "both steps use the same DP-compatible model (GroupNorm); the DP step includes "
        "per-sample gradients, clipping and noise; each train_local call's Opacus wrapping "
        f"is included; target <= {TARGETS['dp_step_ratio']}x for the default DP backbone on GPU"
    )
    return {"rows": rows, "errors": errors}, table
