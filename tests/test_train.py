"""Local training: config parsing, FedProx, learning a trivial task, determinism, eval."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.augment import augment_batch, to_float
from common.losses import class_weights, make_loss
from common.models import build_model, get_weights, set_weights
from common.train import TrainConfig, evaluate, predict, proximal_term, train_local

CLASSES = ["red", "green", "mel"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def colour_task(n: int = 48, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = dominant colour: separable, so any working training loop learns it fast."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    colours = torch.tensor([[220.0, 40, 40], [40, 220, 40], [40, 40, 220]])
    noise = torch.randn(n, size, size, 3, generator=g) * 25
    x = (colours[y][:, None, None, :] + noise).clamp(0, 255).to(torch.uint8)
    return x, y


def test_from_run_config_reads_kebab_keys_and_ignores_others() -> None:
    cfg = TrainConfig.from_run_config(
        {"local-epochs": 3, "proximal-mu": "0.1", "augment": "false", "lr": 0.01, "model": "x"}
    )
    assert cfg.local_epochs == 3 and cfg.proximal_mu == 0.1 and cfg.augment is False
    assert cfg.lr == 0.01 and cfg.optimizer == "adam"
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")


def test_proximal_gradient_is_mu_times_drift_after_steps() -> None:
    torch.manual_seed(0)
    model = build_model("test_resnet", 3)
    w_global = [p.detach().clone() for p in model.parameters()]
    x, y = colour_task(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mu = 0.37
    for _ in range(3):  # drift away from the global model
        opt.zero_grad()
        loss = F.cross_entropy(model(to_float(x)), y) + proximal_term(model, w_global, mu)
        loss.backward()
        opt.step()
    params = list(model.parameters())
    grads = torch.autograd.grad(proximal_term(model, w_global, mu), params)
    drift = 0.0
    for g, p, w0 in zip(grads, params, w_global, strict=True):
        torch.testing.assert_close(g, mu * (p.detach() - w0))
        drift += float((p.detach() - w0).abs().sum())
    assert drift > 0
    named = dict(zip([n for n, _ in model.named_parameters()], w_global, strict=True))
    assert torch.allclose(proximal_term(model, named, mu), proximal_term(model, w_global, mu))


def test_fedprox_keeps_weights_near_global_at_every_step() -> None:
    x, y = colour_task(32)
    start = build_model("test_resnet", 3)
    w0 = get_weights(start)

    def drift(mu: float) -> float:
        model = build_model("test_resnet", 3)
        set_weights(model, w0)
        cfg = TrainConfig(local_steps=6, batch_size=8, proximal_mu=mu, optimizer="sgd", lr=0.05)
        train_local(model, x, y, cfg, num_classes=3)
        w = get_weights(model)
        return sum(float((w[k] - w0[k]).pow(2).sum()) for k, _ in model.named_parameters())

    assert drift(5.0) < 0.8 * drift(0.0)


def test_learns_separable_task_with_test_efficientnet() -> None:
    x, y = colour_task(48)
    model = build_model("test_efficientnet", 3)
    before = evaluate(model, x, y, CLASSES)
    cfg = TrainConfig(local_epochs=8, batch_size=16, lr=3e-3)
    out = train_local(model, x, y, cfg, num_classes=3, progress=True)
    after = evaluate(model, x, y, CLASSES)
    assert out["steps"] == 8 * 3 and out["num_examples"] == 48
    assert out["images_per_second"] > 0 and np.isfinite(out["train_loss"])
    assert after["accuracy"] >= 0.9 > before["accuracy"]
    assert after["loss"] < before["loss"]
    assert after["n"] == 48 and "auroc_mel" in after


def test_same_seed_same_weights_different_seed_differs() -> None:
    x, y = colour_task(24)
    init = get_weights(build_model("test_efficientnet", 3))
    cfg = TrainConfig(local_steps=3, batch_size=8, augment=True, seed=7)

    def run(seed: int | None) -> dict[str, torch.Tensor]:
        model = build_model("test_efficientnet", 3)
        set_weights(model, init)
        train_local(model, x, y, cfg, num_classes=3, seed=seed)
        return get_weights(model)

    a, b, c = run(None), run(7), run(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_predict_probabilities_and_bad_inputs() -> None:
    x, y = colour_task(10)
    model = build_model("test_resnet", 3)
    model.train()
    probs = predict(model, x, batch_size=4)
    assert probs.shape == (10, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="labels"):
        train_local(model, x, y + 5, TrainConfig(), num_classes=3)
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        train_local(model, x, y[:9], TrainConfig(), num_classes=3)


def test_augment_batch_shapes_determinism_and_layouts() -> None:
    x, _ = colour_task(6)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = augment_batch(x, g1)
    b = augment_batch(x.permute(0, 3, 1, 2), g2)  # NCHW input gives the same result
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, to_float(x))
    # the colour (the label) survives augmentation: channel order of means unchanged
    clean = to_float(x).mean((2, 3)).argmax(1)
    assert torch.equal(a.mean((2, 3)).argmax(1), clean)


def test_losses_weights_and_focal_reduces_to_ce() -> None:
    counts = np.array([10, 30, 0, 60])
    w = class_weights(counts)
    np.testing.assert_allclose(w, [100 / 40, 100 / 120, 0.0, 100 / 240])
    logits = torch.randn(12, 4)
    target = torch.tensor([0, 1, 3] * 4)
    ce = F.cross_entropy(logits, target)
    torch.testing.assert_close(make_loss("ce", counts, 2.0)(logits, target), ce)
    torch.testing.assert_close(make_loss("focal", counts, 0.0)(logits, target), ce)
    weighted = make_loss("weighted-ce", counts, 2.0)(logits, target)
    per_sample = F.cross_entropy(logits, target, reduction="none") * torch.tensor(w).float()[target]
    torch.testing.assert_close(weighted, per_sample.mean())
    focal = make_loss("focal", counts, 2.0)(logits, target)
    assert focal < ce  # down-weights easy examples
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("dice", counts, 2.0)
