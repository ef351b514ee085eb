"""A real deployment on 127.0.0.1: TLS SuperLink with SuperNode authentication, three sites.

Real processes, exactly the commands of docs/deployment.md: ``flower-superlink`` (TLS,
``--enable-supernode-auth``, ``--database``, no runtime dependency installation),
``flwr supernode register`` for each site's public key, one ``flower-supernode`` per site
with the CA certificate, its private key and its own ``--node-config``, then ``flwr run``.
One SuperLink and three SuperNodes serve every test of this module (like a real federation
serving several runs); every process is killed in teardown, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.deploy import FederationFiles, make_federation
from tests.deploy_harness import (
    BIN,
    Harness,
    Proc,
    base_env,
    flwr_cli,
    flwr_json,
    free_port,
    write_flwr_config,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SITES = ["site-a", "site-b", "site-c"]
CONNECTION = "fedskin-test"
STARTUP_S = 120.0  # generous: the machine is shared and has 2 cores


# ----------------------------------------------------------------------------- toy app
TOY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "toyapp"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedskintest"

[tool.flwr.app.components]
serverapp = "toyapp.server:app"
clientapp = "toyapp.client:app"

[tool.flwr.app.config]
num-server-rounds = 2
num-sites = 3
out-dir = ""
"""

TOY_SERVER = '''\
"""Toy ServerApp: average a vector over every connected site for a few rounds."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["num-sites"])
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.5)
    x = np.zeros(3)
    history = []
    for rnd in range(1, int(context.run_config["num-server-rounds"]) + 1):
        msgs = [
            Message(
                RecordDict({"arrays": ArrayRecord([x]), "config": ConfigRecord({"round": rnd})}),
                dst_node_id=node,
                message_type="train",
            )
            for node in grid.get_node_ids()
        ]
        replies = [r for r in grid.send_and_receive(msgs, timeout=60) if r.has_content()]
        sites = sorted(str(r.content["meta"]["site"]) for r in replies)
        x = np.mean([r.content["arrays"].to_numpy_ndarrays()[0] for r in replies], axis=0)
        history.append({"round": rnd, "sites": sites, "x": x.tolist()})
    out = Path(str(context.run_config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"history": history}))
'''

TOY_CLIENT = '''\
"""Toy ClientApp: add this site's node-config value to the received vector."""

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    x = msg.content["arrays"].to_numpy_ndarrays()[0]
    site = str(context.node_config["site"])
    value = float(context.node_config["value"])
    content = RecordDict({"arrays": ArrayRecord([x + value]), "meta": ConfigRecord({"site": site})})
    return Message(content=content, reply_to=msg)
'''


def write_toy_app(root: Path) -> Path:
    pkg = root / "toyapp"
    pkg.mkdir(parents=True)
    (root / "pyproject.toml").write_text(TOY_PYPROJECT)
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text(TOY_SERVER)
    (pkg / "client.py").write_text(TOY_CLIENT)
    return root


# ------------------------------------------------------------------------- deployment
@dataclass
class Deployment:
    harness: Harness
    work: Path
    keys: FederationFiles
    port: int
    admin_env: dict[str, str]
    superlink: Proc
    supernodes: dict[str, Proc]
    intruders: dict[str, Proc]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def site_dir(self, site: str) -> Path:
        return self.work / "sites" / site

    def flwr(self, *args: str, timeout: float = 120.0):  # noqa: ANN201 - CompletedProcess
        return flwr_cli(list(args), self.admin_env, self.work, timeout)


def superlink_argv(keys: FederationFiles, port: int, database: Path) -> list[str]:
    """The SuperLink command of docs/deployment.md (host 127.0.0.1 instead of 0.0.0.0)."""
    return [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(keys.server_ca_cert),
        "--ssl-certfile", str(keys.server_cert),
        "--ssl-keyfile", str(keys.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(database),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip


def supernode_argv(
    address: str,
    *,
    root_certificates: Path | None,
    private_key: Path,
    node_config: str,
    extra: tuple[str, ...] = (),
) -> list[str]:
    argv = [str(BIN / "flower-supernode"), "--superlink", address]
    if root_certificates is not None:
        argv += ["--root-certificates", str(root_certificates)]
    argv += ["--auth-supernode-private-key", str(private_key)]
    argv += ["--node-config", node_config, "--port", str(free_port()), *extra]
    return argv


def site_node_config(dep_work: Path, site: str, value: float) -> str:
    """What a hospital puts in --node-config: its own name and local paths only."""
    root = dep_work / "sites" / site
    return (
        f"site='{site}' value={value} data-format='ham-dataverse' "
        f"data-path='{root / 'data'}' manifest='{root / 'manifest.csv'}' "
        f"cache-dir='{root / 'cache'}' state-dir='{root / 'state'}'"
    )


def nodes_online(dep: Deployment) -> list[dict]:
    listing = flwr_json(["supernode", "list", CONNECTION], dep.admin_env, dep.work)
    return [n for n in listing.get("nodes", []) if n.get("status") == "online"]


def register_sites(dep: Deployment, sites: list[str]) -> None:
    """``flwr supernode register`` for each site, in parallel (each CLI start costs seconds)."""
    procs = [
        subprocess.Popen(
            [
                str(BIN / "flwr"),
                "supernode",
                "register",
                str(dep.keys.sites[site].public_key),
                CONNECTION,
                "--name",
                site,
            ],
            env=dep.admin_env,
            cwd=dep.work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        for site in sites
    ]
    for site, proc in zip(sites, procs, strict=True):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"registering {site} failed:\n{out}"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("deploy")
    keys = make_federation(work / "keys", sites=[*SITES, "rogue"], days=1)
    other_ca = make_federation(work / "other-federation", sites=["x"]).ca_cert
    harness = Harness(work)
    try:
        port = free_port()
        superlink = harness.start(
            "superlink",
            superlink_argv(keys, port, work / "superlink" / "state.db"),
            base_env(work / "superlink" / "flwr-home"),
        )
        superlink.wait_for(r"Uvicorn running on https://127\.0\.0\.1", STARTUP_S)
        admin_env = base_env(work / "admin" / "flwr-home")
        write_flwr_config(
            work / "admin" / "flwr-home", CONNECTION, f"127.0.0.1:{port}", keys.ca_cert
        )
        dep = Deployment(harness, work, keys, port, admin_env, superlink, {}, {})
        # Intruders start now so their (slow, CPU-bound) start-up overlaps the set-up.
        a_key = keys.sites["site-a"].private_key  # a registered key: only TLS can stop them
        for name, ca, key in (
            ("rogue", keys.sites["rogue"].ca_cert, keys.sites["rogue"].private_key),
            ("no-ca", None, a_key),
            ("wrong-ca", other_ca, a_key),
        ):
            argv = supernode_argv(
                dep.address, root_certificates=ca, private_key=key,
                node_config="site='site-a' value=100.0", extra=("--max-retries", "1"),
            )  # fmt: skip
            dep.intruders[name] = harness.start(
                f"supernode-{name}", argv, base_env(work / "intruders" / name / "flwr-home")
            )
        register_sites(dep, SITES)
        for i, site in enumerate(SITES):
            argv = supernode_argv(
                dep.address,
                root_certificates=keys.sites[site].ca_cert,
                private_key=keys.sites[site].private_key,
                node_config=site_node_config(work, site, float(i + 1)),
            )
            env = base_env(dep.site_dir(site) / "flwr-home")
            # Three sites share 2 cores here: one torch thread each avoids oversubscription.
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            dep.supernodes[site] = harness.start(f"supernode-{site}", argv, env)
        superlink.wait_for(r"Activated node_id=", STARTUP_S, count=len(SITES))
        yield dep
    finally:
        survivors = harness.stop_all()
    assert not survivors, f"processes survived teardown: {survivors}"


def launch(dep: Deployment, app_dir: Path, run_config: str) -> int:
    """``flwr run`` and return the run id (fails with all process logs if it did not start)."""
    res = dep.flwr("run", str(app_dir), CONNECTION, "--run-config", run_config, "--format", "json")
    try:
        out = json.loads(res.stdout)
    except json.JSONDecodeError:
        out = {}
    assert res.returncode == 0 and out.get("success"), (
        f"flwr run failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n" + dep.harness.logs()
    )
    return int(out["run-id"])


def finish(dep: Deployment, run_id: int, timeout: float) -> dict:
    """Wait for the SuperLink to log the run's end, then check its status via the CLI."""
    try:
        dep.superlink.wait_for(rf"Finished task \d+ of run {run_id}", timeout)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{dep.harness.logs()}") from err
    listing = flwr_json(["list", CONNECTION, "--run-id", str(run_id)], dep.admin_env, dep.work)
    run = listing["runs"][0]
    assert run["status"] == "finished:completed", f"{run}\n{dep.harness.logs()}"
    return run


# ------------------------------------------------------------------------------ tests
def _real_apps_present() -> bool:
    return all(
        (REPO / rel).is_file() and "app = " in (REPO / rel).read_text()
        for rel in ("server/server_app.py", "client/client_app.py")
    )


def test_superlink_serves_tls_and_requires_registered_nodes(deployment: Deployment) -> None:
    text = deployment.superlink.text()
    assert "Uvicorn running on https://" in text  # TLS, not plain HTTP
    assert "SuperNode authentication is disabled" not in text
    assert (deployment.work / "superlink" / "state.db").is_file()  # state survives restarts
    assert len(nodes_online(deployment)) == len(SITES)


@pytest.mark.skipif(
    _real_apps_present() and not os.environ.get("FEDSKIN_DEPLOY_TOY"),
    reason="the fedskin apps run instead (set FEDSKIN_DEPLOY_TOY=1 to run the toy app too)",
)
def test_toy_run_over_tls_with_authenticated_sites(deployment: Deployment, tmp_path: Path) -> None:
    """Deployment plumbing on its own, with exact arithmetic: each site adds its value."""
    dep = deployment
    app = write_toy_app(tmp_path / "toy")
    run_id = launch(dep, app, f"out-dir='{tmp_path / 'out'}' num-server-rounds=2")
    run = finish(dep, run_id, timeout=120)
    assert run["fab-name"] == "toyapp"

    history = json.loads((tmp_path / "out" / "result.json").read_text())["history"]
    assert [h["sites"] for h in history] == [SITES, SITES]  # every site in every round
    # Site values are 1, 2, 3: the average adds 2 per round, so 2 then 4.
    assert history[0]["x"] == pytest.approx([2.0] * 3)
    assert history[1]["x"] == pytest.approx([4.0] * 3)


def test_unregistered_supernode_is_refused(deployment: Deployment) -> None:
    dep = deployment
    rogue = dep.intruders["rogue"]  # right CA, key never registered
    code = rogue.wait_exit(STARTUP_S)
    assert code not in (None, 0), rogue.text()
    assert "Failed to activate SuperNode" in rogue.text()
    dep.superlink.wait_for(r"No SuperNode found with the given public key", 10)
    # The federation still has exactly the three registered sites, all online.
    assert len(nodes_online(dep)) == len(SITES)


@pytest.mark.parametrize("which", ["no-ca", "wrong-ca"])
def test_supernode_without_the_federation_ca_cannot_connect(
    deployment: Deployment, which: str
) -> None:
    """No CA (system store) or another federation's CA: TLS fails before authentication."""
    proc = deployment.intruders[which]
    code = proc.wait_exit(STARTUP_S)
    assert code not in (None, 0), proc.text()
    assert "CERTIFICATE_VERIFY_FAILED" in proc.text()


def test_admin_cli_needs_the_federation_ca(deployment: Deployment, tmp_path: Path) -> None:
    other = make_federation(tmp_path / "other", sites=["x"])
    home = tmp_path / "flwr-home"
    write_flwr_config(home, "other", deployment.address, other.ca_cert)
    res = flwr_cli(["list", "other"], base_env(home), tmp_path)
    assert res.returncode != 0
    assert "unavailable" in (res.stdout + res.stderr).lower()


# ------------------------------------------------------------------------ the real app
def copy_project(dest: Path) -> Path:
    """The fedskin app as a site would have it installed, minus ``[tool.flwr.federations]``.

    ``flwr run`` on a project that still has that legacy section migrates it into the
    Flower config *and rewrites pyproject.toml*; a copy keeps the checkout untouched.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", ".*")
    for pkg in ("server", "client", "common", "simulations"):
        if (REPO / pkg).is_dir():
            shutil.copytree(REPO / pkg, dest / pkg, ignore=ignore)
    lines, keep = [], True
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("["):
            keep = not line.strip("[] ").startswith("tool.flwr.federations")
        if keep:
            lines.append(line)
    (dest / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return dest


def make_site_data(dep: Deployment, tmp_path: Path) -> None:
    """One synthetic HAM10000 folder per site holding only that site's images + manifest."""
    import pandas as pd

    from common.data.partition import partition, write_manifest
    from common.data.sources import load_source
    from common.data.synth import synthesize

    pooled = synthesize("ham-dataverse", tmp_path / "pooled", n_images=300, image_size=16)
    source = load_source("ham-dataverse", pooled)
    manifest = partition(source.meta, "iid", classes=source.classes, num_sites=3, seed=0)
    names = sorted(manifest["site"].astype(str).unique())
    assert len(names) == 3, names
    meta = pd.read_csv(pooled / "HAM10000_metadata.csv", dtype=str)
    images = {p.stem: p for p in pooled.rglob("*.jpg")}
    for name, site in zip(names, SITES, strict=True):
        rows = manifest[manifest["site"].astype(str) == name].copy()
        rows["site"] = site
        data = dep.site_dir(site) / "data"
        (data / "images").mkdir(parents=True, exist_ok=True)
        meta[meta["image_id"].isin(rows["image_id"])].to_csv(
            data / "HAM10000_metadata.csv", index=False
        )
        for image_id in rows["image_id"]:
            shutil.copy(images[image_id], data / "images" / f"{image_id}.jpg")
        write_manifest(rows, dep.site_dir(site) / "manifest.csv")


@pytest.mark.skipif(not _real_apps_present(), reason="fedskin ServerApp/ClientApp not written yet")
def test_fedskin_apps_two_rounds_three_sites(deployment: Deployment, tmp_path: Path) -> None:
    dep = deployment
    make_site_data(dep, tmp_path)
    app = copy_project(tmp_path / "app")
    out = tmp_path / "run"
    run_config = (
        f"model='test_efficientnet' image-size=16 num-server-rounds=2 batch-size=16 "
        f"local-epochs=2 loss='ce' augment=false amp=false channels-last=false "
        f"data-format='ham-dataverse' min-train-nodes=3 out-dir='{out}' run-name='deploy-test'"
    )
    run_id = launch(dep, app, run_config)
    # 18 ClientApp processes (query + 2 x (train, evaluate) + test at 3 sites), each importing
    # torch + timm (~10 CPU-s): ~2 min on an idle 2-core box, much longer on a loaded one.
    finish(dep, run_id, timeout=900)

    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert len(rounds) == 2
    for record in rounds:
        assert sorted(record["train"]) == SITES, record  # every site trained every round
        assert sorted(record["validation"]["sites"]) == SITES
        assert not record["failures"] and not record["rejected"]
    assert sorted(metrics["test"]["sites"]) == SITES
    # The global model improved: the final model (last checkpoint, written on the server)
    # has a lower cross-entropy than the seeded initial model on the sites' training images.
    initial, final = _pooled_train_loss(dep, out)
    assert final < initial, (initial, final)


def _pooled_train_loss(dep: Deployment, run_dir: Path) -> tuple[float, float]:
    """Cross-entropy of the initial and the final global model over all sites' train split."""
    import numpy as np
    import torch

    from common.data.site_data import load_site
    from common.models import build_model, set_weights
    from common.train import predict
    from server.server_app import initial_weights

    cfg = {"model": "test_efficientnet", "seed": 0, "pretrained": "", "dp": False}
    images, labels = [], []
    for site in SITES:
        root = dep.site_dir(site)
        data = load_site(
            {
                "data-format": "ham-dataverse", "data-path": str(root / "data"),
                "manifest": str(root / "manifest.csv"), "site": site,
                "cache-dir": str(root / "cache"), "image-size": 16,
            }
        )  # fmt: skip
        images.append(data.images["train"])
        labels.append(data.labels["train"])
    x, y = torch.from_numpy(np.concatenate(images)), np.concatenate(labels)
    losses = []
    for state in (
        initial_weights(cfg, 7),
        torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["arrays"],
    ):
        model = build_model("test_efficientnet", 7)
        set_weights(model, state)
        probs = np.asarray(predict(model, x, device=torch.device("cpu")))
        losses.append(float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()))
    return losses[0], losses[1]
