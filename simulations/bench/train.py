"""1. Local training throughput: the client's ``train_local`` against a plain PyTorch loop."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from typing import Any

import torch
from rich.console import Console
from torch import nn

from simulations.bench.measure import SectionTable, fake_data, fmt, median, timed
from simulations.bench.settings import NUM_CLASSES, TARGETS, BenchSettings


class PlainLoop:
    """The reference: a textbook PyTorch loop over device tensors, nothing else.

    Same precision policy as the client on CUDA (bf16 autocast, channels_last) so the ratio
    measures the client's overhead, not a precision difference.
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        lr: float,
        batch_size: int,
        device: torch.device,
    ) -> None:
        from common.augment import to_float

        self.to_float = to_float
        self.device = device
        cuda = device.type == "cuda"
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.images = images.to(device)
        self.labels = labels.to(device=device, dtype=torch.long)
        self.batch_size = batch_size
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.criterion = nn.CrossEntropyLoss()
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        )

    def run(self, steps: int) -> int:
        """``steps`` optimizer steps; returns the number of images seen."""
        self.model.train()
        seen = 0
        done = 0
        while done < steps:
            perm = torch.randperm(len(self.images), device=self.device)
            for idx in perm.split(self.batch_size):
                x = self.to_float(self.images[idx]).contiguous(memory_format=self.memory_format)
                with self.autocast:
                    logits = self.model(x)
                loss = self.criterion(logits.float(), self.labels[idx])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                seen += len(idx)
                done += 1
                if done == steps:
                    break
        return seen


def bench_train(s: BenchSettings, console: Console) -> tuple[dict[str, Any], SectionTable]:
    """Client ``train_local`` against :class:`PlainLoop`, interleaved, augmentation off."""
    from common.models import build_model
    from common.train import TrainConfig, train_local

    device = torch.device(s.device)
    n = s.batch_size * s.steps  # one epoch per timed call: every batch is full
    images, labels = fake_data(n, s.image_size)
    lr = 1e-3
    cfg = TrainConfig(batch_size=s.batch_size, local_steps=s.steps, lr=lr, loss="ce", augment=False)
    client_model = build_model(s.model, NUM_CLASSES)
    plain = PlainLoop(copy.deepcopy(client_model), images, labels, lr, s.batch_size, device)

    def client(c: TrainConfig, data: torch.Tensor) -> tuple[float, dict[str, float]]:
        return timed(
            lambda: train_local(
                client_model, data, labels, c, num_classes=NUM_CLASSES, device=device
            ),
            device,
        )

    if s.warmup:
        client(replace(cfg, local_steps=s.warmup), images)
        client(replace(cfg, local_steps=s.warmup, augment=True), images)
        timed(lambda: plain.run(s.warmup), device)
    on_device = images.to(device) if device.type == "cuda" else None
    runs: dict[str, list[float]] = {
        "client": [],
        "client_reported": [],
        "plain": [],
        "client_augment": [],
        "client_on_device": [],
    }
    for r in range(s.repeats):
        console.log(f"[1] training throughput, repeat {r + 1}/{s.repeats}")
        # A B A B: the order alternates so drift in machine load hits both alike.
        order = ["client", "plain"] if r % 2 == 0 else ["plain", "client"]
        for which in order:
            if which == "client":
                secs, out = client(cfg, images)
                runs["client"].append(n / secs)
                runs["client_reported"].append(out["images_per_second"])
            else:
                secs, seen = timed(lambda: plain.run(s.steps), device)
                runs["plain"].append(seen / secs)
        secs, _ = client(replace(cfg, augment=True), images)
        runs["client_augment"].append(n / secs)
        if on_device is not None:
            secs, _ = client(cfg, on_device)
            runs["client_on_device"].append(n / secs)
    runs = {k: v for k, v in runs.items() if v}
    med = {k: median(v) for k, v in runs.items()}
    result: dict[str, Any] = {
        "images_per_call": n,
        "client_images_per_second": med["client"],
        "client_reported_images_per_second": med["client_reported"],
        "plain_images_per_second": med["plain"],
        "client_augment_images_per_second": med["client_augment"],
        "ratio": med["client"] / med["plain"],
        "augment_cost_ratio": med["client_augment"] / med["client"],
        "runs": runs,
    }
    if "client_on_device" in med:
        result["client_on_device_images_per_second"] = med["client_on_device"]
        result["ratio_on_device"] = med["client_on_device"] / med["plain"]

    table = SectionTable(
        f"1. Local training throughput: {s.model} at {s.image_size} px, batch {s.batch_size}, "
        f"median of {s.repeats} (images/s)",
        ["loop", "images/s", "vs plain loop"],
    )
    labels_txt = {
        "plain": "plain PyTorch loop (reference)",
        "client": "client train_local (whole call, augment off)",
        "client_reported": "client train_local, its own timer (excl. setup)",
        "client_on_device": "client train_local, split already on the GPU",
        "client_augment": "client train_local with augmentation (info)",
    }
    for key, label in labels_txt.items():
        if key in med:
            table.rows.append([label, fmt(med[key]), f"{med[key] / med['plain']:.3f}"])
    table.notes.append(
        f"{n} images per call ({s.steps} steps), {s.warmup} warm-up steps excluded, "
        f"interleaved A B / B A; target ratio >= {TARGETS['train_ratio']}"
    )
    return result, table
