"""What a ClientApp process start costs a deployed round, and what the warm launcher saves.

``fedskin bench deploy-overhead`` (or ``python -m simulations.deploy_overhead``) starts two
real loopback federations one after the other on the same data and the same app (a SuperLink,
one SuperNode per site, ``flwr run``):

* ``cold``: Flower's default, ``flower-supernode`` (``--isolation subprocess``): its
  ``flower-superexec`` starts a fresh ``flwr-clientapp`` process, which imports torch, timm
  and the project, for every message;
* ``warm``: ``flower-supernode --isolation process`` plus ``fedskin site-exec``
  (:mod:`client.warm_exec`), which imported them once and forks one ClientApp per message.

It prints, per mode, the seconds each ClientApp process lived (one per message, polled from
/proc), the round time the ServerApp recorded (``metrics.json``), and the share of a round
the cold start takes: (cold round - warm round) / cold round. Also the cost of the imports
alone in a fresh interpreter. Needs a checkout (it uses ``tests/deploy_harness.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from server.results import load_results

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "bench"
RUN_CONFIG: dict[str, object] = {  # the integration test's configuration
    "model": "test_efficientnet",
    "image-size": 16,
    "batch-size": 16,
    "local-epochs": 2,
    "loss": "ce",
    "augment": False,
    "amp": False,
    "channels-last": False,
    "data-format": "ham-dataverse",
    "run-name": "deploy-overhead",
}


def _harness():  # noqa: ANN202 - the module
    if not (REPO / "tests" / "deploy_harness.py").is_file():
        raise SystemExit("deploy-overhead needs a fedskin checkout (tests/deploy_harness.py)")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import tests.deploy_harness as h

    return h


def _value(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f"'{v}'" if isinstance(v, str) else str(v)


def copy_project(dest: Path, ref: str | None = "HEAD") -> Path:
    """The app as ``flwr run`` ships it (the project's packages and pyproject.toml), from
    the git commit ``ref`` (so edits in progress in the checkout do not enter the figures),
    or from the working tree when ``ref`` is None or this is not a git checkout."""
    packages = ("server", "client", "common", "simulations")
    dest.mkdir(parents=True, exist_ok=True)
    if ref is not None and (REPO / ".git").exists():
        archive = subprocess.run(
            ["git", "archive", ref, *packages, "pyproject.toml"],
            cwd=REPO, check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        return dest
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", ".*")
    for pkg in packages:
        shutil.copytree(REPO / pkg, dest / pkg, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def make_site_data(work: Path, sites: list[str], n_images: int) -> None:
    """A synthetic HAM10000 folder per site (its own images only) and its manifest."""
    import pandas as pd

    from common.data.partition import partition, write_manifest
    from common.data.sources import load_source
    from common.data.synth import synthesize

    pooled = synthesize("ham-dataverse", work / "pooled", n_images=n_images, image_size=16)
    source = load_source("ham-dataverse", pooled)
    manifest = partition(source.meta, "iid", classes=source.classes, num_sites=len(sites), seed=0)
    meta = pd.read_csv(pooled / "HAM10000_metadata.csv", dtype=str)
    images = {p.stem: p for p in pooled.rglob("*.jpg")}
    names = sorted(manifest["site"].astype(str).unique())
    for name, site in zip(names, sites, strict=True):
        rows = manifest[manifest["site"].astype(str) == name].copy()
        rows["site"] = site
        data = work / "sites" / site / "data"
        (data / "images").mkdir(parents=True, exist_ok=True)
        meta[meta["image_id"].isin(rows["image_id"])].to_csv(
            data / "HAM10000_metadata.csv", index=False
        )
        for image_id in rows["image_id"]:
            shutil.copy(images[image_id], data / "images" / f"{image_id}.jpg")
        write_manifest(rows, work / "sites" / site / "manifest.csv")


def node_config(work: Path, site: str) -> str:
    root = work / "sites" / site
    return (
        f"site='{site}' data-format='ham-dataverse' data-path='{root / 'data'}' "
        f"manifest='{root / 'manifest.csv'}' cache-dir='{root / 'cache'}' "
        f"state-dir='{root / 'state'}'"
    )


@dataclass
class Lifetimes:
    """ClientApp processes seen under some roots, with first and last time seen."""

    seen: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def watch(self, h, roots: list, match: str | None, every: float = 0.05) -> None:  # noqa: ANN001
        while not self.stop.is_set():
            now = time.monotonic()
            for root in roots:
                for pid in h.descendants(root.popen.pid):
                    if match is not None and match not in h.cmdline(pid):
                        continue
                    start = h.start_time(pid)
                    if start is not None:
                        self.seen.setdefault((pid, start), [now, now])[1] = now
            time.sleep(every)

    def seconds(self) -> list[float]:
        return [last - first for first, last in self.seen.values()]


def run_mode(
    mode: str,
    work: Path,
    app: Path,
    sites: list[str],
    rounds: int,
    auth_secret_file: Path | None = None,
) -> dict:
    """One federation in ``mode`` (cold | warm), one run of ``rounds`` rounds; its figures.

    ``auth_secret_file`` (warm only): the SuperNodes require SuperExec authentication
    (``--superexec-auth-secret-file``) and the launchers sign with the same secret."""
    h = _harness()
    home = work / mode
    harness = h.Harness(home)
    try:
        port = h.free_port()
        superlink = harness.start(
            "superlink",
            [
                str(h.BIN / "flower-superlink"), "--insecure",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(port),
            ],
            h.base_env(home / "superlink" / "flwr-home"),
        )  # fmt: skip
        superlink.wait_for(r"Uvicorn running on http://127\.0\.0\.1", 180)
        nodes, execs = [], []
        for site in sites:
            env = h.base_env(home / site / "flwr-home")
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            runtime_port = h.free_port()
            argv = [
                str(h.BIN / "flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{port}",
                "--node-config", node_config(work, site), "--port", str(runtime_port),
            ]  # fmt: skip
            if mode == "warm":
                argv += ["--isolation", "process"]
                if auth_secret_file is not None:
                    argv += ["--superexec-auth-secret-file", str(auth_secret_file)]
            node = harness.start(f"supernode-{site}", argv, env)
            nodes.append(node)
            if mode == "warm":
                execs.append(
                    harness.start(
                        f"site-exec-{site}",
                        h.site_exec_argv(
                            f"127.0.0.1:{runtime_port}",
                            parent_pid=node.popen.pid,
                            auth_secret_file=auth_secret_file,
                        ),
                        env,
                    )
                )
        t0 = time.monotonic()
        warmup = [float(e.wait_for(r"imported in ([\d.]+) s", 300)[0].group(1)) for e in execs]
        ready_s = time.monotonic() - t0 if execs else 0.0
        superlink.wait_for(r"Activated node_id=", 180, count=len(sites))

        admin = h.base_env(home / "admin" / "flwr-home")
        h.write_flwr_config(home / "admin" / "flwr-home", CONNECTION, f"127.0.0.1:{port}", None)
        out = home / "run"
        cfg = {
            **RUN_CONFIG,
            "num-server-rounds": rounds,
            "min-nodes": len(sites),
            "min-train-nodes": len(sites),
            "out-dir": str(out),
        }
        watcher = Lifetimes()
        thread = threading.Thread(
            target=watcher.watch,
            args=(h, execs or nodes, None if execs else "flwr-clientapp"),
            daemon=True,
        )
        thread.start()
        res = h.flwr_cli(
            ["run", str(app), CONNECTION, "--run-config",
             " ".join(f"{k}={_value(v)}" for k, v in cfg.items()), "--format", "json"],
            admin, home, timeout=300,
        )  # fmt: skip
        try:
            run_id = int(json.loads(res.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError) as err:
            raise RuntimeError(f"flwr run failed:\n{res.stdout}\n{res.stderr}") from err
        t_run = time.monotonic()
        superlink.wait_for(rf"Finished task \d+ of run {run_id}\b", 1800)
        wall = time.monotonic() - t_run
        watcher.stop.set()
        thread.join()
        round_s = [float(r.seconds) for r in load_results(out).rounds]
        result = {
            "mode": mode,
            "messages": len(watcher.seen),
            "clientapp_s": sorted(watcher.seconds()),
            "round_s": round_s,
            "run_wall_s": wall,
            "warmup_s": warmup,
            "ready_s": ready_s,
            "out": str(out),
            "logs": {p.name: str(p.log) for p in harness.procs},
        }
    finally:
        survivors = harness.stop_all()
        if survivors:
            print(f"warning: processes survived: {survivors}", file=sys.stderr)
    result["survivors"] = survivors
    return result


def import_seconds(repeat: int = 2) -> list[float]:
    """Wall seconds of a fresh interpreter importing what a ClientApp imports."""
    out = []
    code = "import flwr.supernode.runtime.run_clientapp, client.client_app, client.task"
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
        out.append(time.perf_counter() - t0)
    return out


def deploy_overhead(
    sites: int = 2, rounds: int = 3, n_images: int = 300, work: Path | None = None
) -> dict:
    """Both modes on the same data and app; returns (and prints) the figures."""
    import tempfile

    names = [f"site-{chr(ord('a') + i)}" for i in range(sites)]
    root = Path(tempfile.mkdtemp(prefix="fedskin-deploy-overhead-")) if work is None else work
    root.mkdir(parents=True, exist_ok=True)
    make_site_data(root, names, n_images)
    app = copy_project(root / "app")
    imports = import_seconds()
    results = {m: run_mode(m, root, app, names, rounds) for m in ("cold", "warm")}
    cold, warm = results["cold"], results["warm"]
    mean = statistics.fmean
    # Round 1 also pays the first cache fill at every site: the later rounds are the steady state.
    steady = slice(1, None) if rounds > 1 else slice(None)
    cold_round, warm_round = mean(cold["round_s"][steady]), mean(warm["round_s"][steady])
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, nice {os.nice(0)}",
        "sites": sites,
        "rounds": rounds,
        "import_s": imports,
        "cold": cold,
        "warm": warm,
        "cold_round_s": cold_round,
        "warm_round_s": warm_round,
        "round_share": (cold_round - warm_round) / cold_round,
        "speedup": cold_round / warm_round,
        "same_model": same_model(Path(cold["out"]), Path(warm["out"])),
    }
    (root / "deploy-overhead.json").write_text(json.dumps(summary, indent=2))
    print(report(summary))
    print(f"figures: {root / 'deploy-overhead.json'}")
    return summary


def same_model(a: Path, b: Path) -> bool:
    """Whether two runs ended with bit-identical global models (``checkpoints/last.pt``)."""
    import torch

    x, y = (torch.load(p / "checkpoints" / "last.pt", weights_only=True)["arrays"] for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def report(s: dict) -> str:
    med = statistics.median
    lines = [
        f"deploy overhead, {s['sites']} sites x {s['rounds']} rounds, {s['machine']}, {s['date']}",
        "fresh interpreter importing the ClientApp (flwr, torch, timm, project): "
        + ", ".join(f"{x:.1f}" for x in s["import_s"])
        + " s",
        f"{'mode':<6} {'messages':>8} {'ClientApp s/msg (median, min-max)':>36} "
        f"{'round s (steady)':>17} {'rounds s':>22}",
    ]
    for m in ("cold", "warm"):
        r = s[m]
        life = r["clientapp_s"]
        lines.append(
            f"{m:<6} {r['messages']:>8} "
            f"{f'{med(life):.1f} ({life[0]:.1f}-{life[-1]:.1f})' if life else '-':>36} "
            f"{s[f'{m}_round_s']:>17.1f} {', '.join(f'{x:.1f}' for x in r['round_s']):>22}"
        )
    w = s["warm"]
    if w["warmup_s"]:
        lines.append(
            "warm launcher start-up, once per site: "
            + ", ".join(f"{x:.1f}" for x in w["warmup_s"])
            + " s"
        )
    lines.append(
        f"share of a cold round spent starting ClientApps: {100 * s['round_share']:.0f} % "
        f"(round {s['cold_round_s']:.1f} s -> {s['warm_round_s']:.1f} s, "
        f"{s['speedup']:.2f}x)"
    )
    lines.append(f"same final global model in both modes: {'yes' if s['same_model'] else 'NO'}")
    return "\n".join(lines)


def deploy_overhead_cli(
    sites: Annotated[int, typer.Option(help="SuperNodes (sites)")] = 2,
    rounds: Annotated[int, typer.Option(help="rounds per run (the first is not averaged)")] = 3,
    n_images: Annotated[int, typer.Option(help="synthetic images over all sites")] = 300,
    work: Annotated[Path | None, typer.Option(help="work folder (default: a temp folder)")] = None,
) -> None:
    """Seconds per ClientApp message and the round share, Flower's cold start vs site-exec."""
    deploy_overhead(sites, rounds, n_images, work)


if __name__ == "__main__":
    typer.run(deploy_overhead_cli)
