"""Local training: config parsing, FedProx, learning a trivial task, determinism, eval."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss

from common.augment import augment_batch, to_float
from common.config import ConfigError, RunConfig
from common.losses import class_weights, make_loss
from common.metrics import compute_metrics
from common.models import build_model, get_weights, set_weights
from common.train import TrainConfig, predict, train_local
from common.train_config import proximal_term, round_lr

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


def test_from_run_reads_the_typed_config_and_leaves_mu_to_the_server() -> None:
    run = RunConfig.from_mapping(
        {"local-epochs": 3, "proximal-mu": 0.1, "augment": "false", "lr": 0.01, "model": "x"}
    )
    cfg = TrainConfig.from_run(run)
    assert cfg.local_epochs == 3 and cfg.augment is False
    assert cfg.lr == 0.01 and cfg.optimizer == "adam"
    # FedProx's mu is what the server sends with a train message, never the run config's
    assert cfg.proximal_mu == 0.0 and TrainConfig.from_run(run, proximal_mu=0.1).proximal_mu == 0.1
    # a flat dict goes through the one parser: the same typed values, a bad one refused
    assert TrainConfig.from_run(RunConfig.from_mapping(run.to_flat())) == cfg
    with pytest.raises(ConfigError, match="^lr='abc': must be a number$"):
        TrainConfig.from_run(RunConfig.from_flat({"lr": "abc", "server-round": 2}))
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")


def test_cosine_schedule_anneals_the_rate_over_the_rounds_at_sites_and_baselines() -> None:
    from flwr.app import ConfigRecord, Message, RecordDict

    from client.task import train_config
    from simulations.flower_adapter import task_identity

    assert round_lr(0.1, "constant", 7, 10) == 0.1
    rates = [round_lr(0.1, "cosine", r, 10) for r in range(1, 11)]
    assert rates[0] == 0.1 and all(a > b > 0 for a, b in zip(rates, rates[1:], strict=False))
    assert round_lr(0.1, "cosine", 0, 10) == 0.1  # no round (evaluation, fine-tuning)
    assert round_lr(0.1, "cosine", 12, 10) == rates[-1]  # past the last round: the last rate
    run = RunConfig.from_mapping({"lr": 0.1, "lr-schedule": "cosine", "num-server-rounds": 10})
    assert TrainConfig.from_run(run, server_round=4).lr == rates[3]
    # a site takes the round from the server's train message
    with task_identity(run_id=7, node_id=1):
        content = RecordDict({"config": ConfigRecord({"server-round": 4})})
        msg = Message(content, dst_node_id=1, message_type="train")
    assert train_config(run, msg).lr == rates[3]
    with pytest.raises(ConfigError, match="lr-schedule"):
        RunConfig.from_mapping({"lr-schedule": "step"})


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


def _metrics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The site's metrics of ``predict``'s scores, with sklearn's log-loss and the count."""
    probs = predict(model, x)
    out = compute_metrics(y.numpy(), probs, CLASSES)
    return {**out, "loss": log_loss(y.numpy(), probs, labels=[0, 1, 2]), "n": len(probs)}


def test_learns_separable_task_with_test_efficientnet() -> None:
    x, y = colour_task(48)
    model = build_model("test_efficientnet", 3)
    before = _metrics(model, x, y)
    cfg = TrainConfig(local_epochs=8, batch_size=16, lr=3e-3)
    out = train_local(model, x, y, cfg, num_classes=3, progress=True)
    after = _metrics(model, x, y)
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


def test_epoch_batches_are_slices_of_one_seeded_permutation_per_epoch() -> None:
    from common.train_round import epoch_batches

    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batches = list(epoch_batches(10, 4, 5, g, torch.device("cpu")))
    first, second = torch.randperm(10, generator=ref), torch.randperm(10, generator=ref)
    expected = [*first.split(4), *second.split(4)][:5]  # 3 batches per epoch, 5 steps
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4]
    assert all(torch.equal(a, b) for a, b in zip(batches, expected, strict=True))
    assert torch.equal(g.get_state(), ref.get_state())  # no extra draws from the stream


def test_train_loss_is_the_batch_weighted_data_loss_without_the_prox_term() -> None:
    """train_loss is the mean data loss of the steps taken (tallied from the step's own loss)."""
    x, y = colour_task(12)
    torch.manual_seed(0)
    init = get_weights(build_model("test_resnet", 3))
    mu = 50.0  # large enough that including the FedProx term would show (mu * lr < 1: stable)
    cfg = TrainConfig(
        local_steps=2, batch_size=12, proximal_mu=mu, optimizer="sgd", lr=0.01, augment=False
    )
    model = build_model("test_resnet", 3)
    set_weights(model, init)
    benchmark_before = torch.backends.cudnn.benchmark
    out = train_local(model, x, y, cfg, num_classes=3)
    assert torch.backends.cudnn.benchmark == benchmark_before  # global flag left alone on CPU

    # The same two full-batch steps by hand: record the data loss before each step. (Two
    # steps: ReLU + max-pool on 12 tiny images make longer runs sensitive to rounding.)
    ref = build_model("test_resnet", 3)
    set_weights(ref, init)
    ref.train()
    w0 = [p.detach().clone() for p in ref.parameters()]
    criterion = make_loss("weighted-ce", np.bincount(y.numpy(), minlength=3), 2.0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    losses, with_prox, correct = [], [], 0
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(2):
        idx = torch.randperm(12, generator=g)
        logits = ref(to_float(x[idx]))
        data = criterion(logits, y[idx])
        loss = data + proximal_term(ref, w0, mu)
        losses.append(float(data.detach()))
        with_prox.append(float(loss.detach()))
        correct += int((logits.argmax(1) == y[idx]).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert out["train_loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    assert abs(np.mean(with_prox) - np.mean(losses)) > 1e-2  # the check can tell them apart
    assert out["train_accuracy"] == pytest.approx(correct / 24)
    w = get_weights(model)
    assert all(torch.allclose(w[k], v, atol=1e-5) for k, v in get_weights(ref).items())


def test_normalisation_constants_are_built_once_per_device() -> None:
    from common.augment import IMAGENET_MEAN, IMAGENET_STD, cached_constant

    x, _ = colour_task(4)
    a = cached_constant("mean", torch.device("cpu"), torch.float32)
    assert cached_constant("mean", torch.device("cpu"), torch.float32) is a  # cached, not rebuilt
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    assert torch.equal(to_float(x), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("augment", [False, True])
def test_no_host_sync_per_step_on_cuda(augment: bool) -> None:
    """The number of synchronizing CUDA calls does not grow with the number of steps.

    Per-call syncs (loss weights to the device, reading the running sums at the end) are
    fine; a ``.item()`` or a blocking index copy per step would scale with the steps.
    """
    import warnings

    x, y = colour_task(64)
    device = torch.device("cuda")
    x, y = x.to(device), y.to(device)
    model = build_model("test_efficientnet", 3)

    def syncs(steps: int) -> int:
        cfg = TrainConfig(local_steps=steps, batch_size=16, augment=augment)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_local(model, x, y, cfg, num_classes=3, device=device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(2)  # warm-up: cached constants, cuDNN autotuning
    assert syncs(12) == syncs(2)  # 3 epochs of 4 steps against half an epoch


def test_balanced_softmax_is_ce_on_prior_shifted_logits() -> None:
    """Balanced softmax: CE of logits + log(site prior); an absent class is left alone."""
    counts = np.array([10, 30, 0, 60])
    logits = torch.randn(12, 4, requires_grad=True)
    target = torch.tensor([0, 1, 3] * 4)
    loss = make_loss("balanced-softmax", counts)(logits, target)
    prior = torch.tensor([0.1, 0.3, 1e-5, 0.6])
    torch.testing.assert_close(loss, F.cross_entropy(logits + prior.log(), target))
    loss.backward()
    # Plain CE pushes every absent class's score down; here its gradient is ~0, so a site
    # without akiec does not teach the shared model that akiec never happens.
    assert logits.grad[:, 2].abs().max() < 1e-4
    assert logits.grad[:, [0, 1, 3]].abs().max() > 1e-2
    # The per-sample form Opacus needs: reduction="none" gives one loss per sample.
    per = make_loss("balanced-softmax", counts)
    per.reduction = "none"
    assert per(logits.detach(), target).shape == (12,)


def test_with_the_federations_counts_the_sites_losses_add_up_to_the_pooled_loss() -> None:
    """Why class-prior = "federation": balanced-softmax at each site with the federation's
    counts has, weighted by site size, the pooled model's gradient (one FedSGD step is a
    pooled step), even when a class lives at one site only; with each site's own prior it
    does not (the global model then never predicted the classes of one HAM10000 source)."""
    from common.losses import make_loss
    from common.train_config import TrainConfig, loss_counts

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(90, 5, generator=g)
    sites = [torch.tensor([0] * 20 + [1] * 10 + [2] * 10), torch.tensor([1] * 5 + [2] * 45)]
    labels = torch.cat(sites)
    head = torch.nn.Linear(5, 3)

    def grad(x: torch.Tensor, y: torch.Tensor, counts: np.ndarray) -> torch.Tensor:
        head.zero_grad()
        make_loss("balanced-softmax", counts)(head(x), y).backward()
        return head.weight.grad.clone()

    pooled = grad(feats, labels, np.bincount(labels.numpy(), minlength=3))
    fed = TrainConfig(class_counts=tuple(np.bincount(labels.numpy(), minlength=3).tolist()))
    own = TrainConfig()
    parts = [(feats[:40], sites[0]), (feats[40:], sites[1])]

    def summed(cfg: TrainConfig) -> torch.Tensor:
        return sum(len(y) / len(labels) * grad(x, y, loss_counts(cfg, y, 3)) for x, y in parts)

    torch.testing.assert_close(summed(fed), pooled)
    assert (summed(own) - pooled).abs().max() > 0.05
    with pytest.raises(ValueError, match="are not 3 non-negative counts"):
        loss_counts(TrainConfig(class_counts=(1, 2)), sites[0], 3)


def test_a_last_batch_of_one_image_joins_the_batch_before_it() -> None:
    """33 images at batch size 32: the epoch's last batch would hold one image, on which a
    BatchNorm model cannot train (it raised every round); it trains with the batch before
    it, and the round still takes the steps it planned (the next epoch's batch second)."""
    x, y = colour_task(33)
    model = build_model("test_efficientnet", 3)  # BatchNorm
    out = train_local(model, x, y, TrainConfig(local_epochs=1, batch_size=32), num_classes=3)
    assert out["steps"] == 2 and out["num_examples"] == 33 and np.isfinite(out["train_loss"])
