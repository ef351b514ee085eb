"""A real deployment on 127.0.0.1: TLS SuperLink with SuperNode authentication, three sites.

docs/deployment.md runs as written, from key generation to the end of its first run: its
shell blocks in bash (its settings pointed at temporary folders, 127.0.0.1 and free ports),
its systemd units started as systemd would (``systemctl`` is played by the test): the
SuperLink (TLS, ``--enable-supernode-auth``, ``--database``, no runtime dependency
installation), ``flwr supernode register`` for each site's public key, one
``flower-supernode`` per site with the CA certificate, its private key and its own
``--node-config``, then ``flwr run``; later ``flwr stop`` and ``flwr log``. The three sites
run step 5b, the recommended set-up:
``--isolation process`` with a SuperExec secret and ``fedskin site-exec`` next to each
SuperNode (one forked ClientApp per message, no ``flwr-clientapp`` process); a fourth site
joins only for the last run and runs step 5, Flower's default (a fresh ``flwr-clientapp``
process per message), and it is the one killed; it comes back warm, requiring secure
aggregation, for the last run. One SuperLink and these SuperNodes serve every test of this
module, like a real federation serving several runs: an uninterrupted run, the same run
stopped mid-round and resumed, a run during which a site is killed, and two SecAgg+ rounds
during which a site drops out after the key exchange.
Every process is killed in teardown, also on failure.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.version import version
from server.deploy import FederationFiles, add_site_keys, make_federation, plan
from tests.deploy_harness import (
    BIN,
    SYSTEMD_PATH,
    Harness,
    Proc,
    alive_since,
    base_env,
    flwr_cli,
    flwr_json,
    free_port,
    poll_until,
    read_unit,
    site_exec_argv,
    start_time,
    unit_command,
    unit_environment,
    unit_value,
    write_flwr_config,
)
from tests.helpers import check_network_json

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SITES = ["hospital-a", "hospital-b", "hospital-c"]  # the guide's: warm, online for every test
VICTIM = "hospital-d"  # Flower's default SuperNode; joins and is killed in the last test
CONNECTION = "fedskin"  # the guide's flwr connection
STARTUP_S = 120.0  # generous: the machine is shared and has 2 cores
# The coordinating server (SuperLink, and the ServerApp it starts) gets CPU first, as on a
# machine of its own. Starved by the sites' ClientApps and other jobs on this 2-core box,
# Flower 1.41's SQLite state was seen locked for over its 5 s busy timeout: HTTP 500s that
# failed the ServerApp and made SuperNodes exit.
SERVER_PRIORITY = -5


@dataclass
class GuideSteps:
    """What the guide did and what is left of it: the run of its step 6."""

    settings: str  # the settings block, run before each block
    machines: dict[str, dict[str, str]]  # each machine's shell environment
    outputs: list[tuple[str, str, str]]  # (where, machine, output) of every block run
    run_block: str  # step 6: flwr run (the module's first run, fixture full_run)
    release: Path  # FEDSKIN_SRC
    pooled: Pooled  # every site's images, the fourth site's too


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
    launchers: dict[str, Proc] = field(default_factory=dict)  # site -> its fedskin site-exec
    guide: GuideSteps | None = None  # set up by docs/deployment.md

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
    port: int | None = None,
) -> list[str]:
    """``port``: the SuperNode's local Runtime API (``--port``; a free one if None)."""
    argv = [str(BIN / "flower-supernode"), "--superlink", address]
    if root_certificates is not None:
        argv += ["--root-certificates", str(root_certificates)]
    argv += ["--auth-supernode-private-key", str(private_key)]
    argv += ["--node-config", node_config, "--port", str(port or free_port()), *extra]
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


def start_superlink(harness: Harness, work: Path, sites: list[str]) -> Deployment:
    """A federation's keys for ``sites`` and its SuperLink (TLS + SuperNode auth), serving;
    no SuperNode yet (the admin's flwr config points at it)."""
    keys = make_federation(work / "keys", sites=sites, days=1)
    port = free_port()
    superlink = harness.start(
        "superlink",
        superlink_argv(keys, port, work / "superlink" / "state.db"),
        base_env(work / "superlink" / "flwr-home"),
        priority=SERVER_PRIORITY,
    )
    superlink.wait_for(r"Uvicorn running on https://127\.0\.0\.1", STARTUP_S)
    admin_env = base_env(work / "admin" / "flwr-home")
    write_flwr_config(work / "admin" / "flwr-home", CONNECTION, f"127.0.0.1:{port}", keys.ca_cert)
    return Deployment(harness, work, keys, port, admin_env, superlink, {}, {})


def start_site(
    dep: Deployment,
    site: str,
    node_config: str,
    *,
    warm: bool,
    name: str | None = None,
    installed: Path | None = None,
) -> Proc:
    """A registered site's SuperNode with the federation's CA, its key and ``node_config``.

    ``warm``: docs/deployment.md step 5b, ``--isolation process`` with a SuperExec secret
    and ``fedskin site-exec`` next to it (in ``dep.launchers``, stopping with the SuperNode);
    otherwise step 5, Flower's default (a fresh ``flwr-clientapp`` process per message).
    ``installed``: the fedskin code the site runs (PYTHONPATH; default the checkout), e.g.
    the release (``FEDSKIN_SRC``), whose FABs a warm launcher serves.
    """
    keys = dep.keys.sites[site]
    env = base_env(dep.site_dir(site) / "flwr-home")  # the same FLWR_HOME after a restart
    if installed is not None:
        env["PYTHONPATH"] = str(installed)
    # Several sites share 2 cores here: one torch thread each avoids oversubscription
    # (and keeps every site's arithmetic identical from run to run).
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    port, extra, secret = free_port(), (), dep.site_dir(site) / "superexec.secret"
    if warm:
        secret.parent.mkdir(parents=True, exist_ok=True)
        if not secret.is_file():  # 32 random bytes, readable by the site's user only
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32))
        extra = ("--isolation", "process", "--superexec-auth-secret-file", str(secret))
    argv = supernode_argv(
        dep.address,
        root_certificates=keys.ca_cert,
        private_key=keys.private_key,
        node_config=node_config,
        extra=extra,
        port=port,
    )
    name = name or f"supernode-{site}"
    node = dep.supernodes[site] = dep.harness.start(name, argv, env)
    if warm:
        dep.launchers[site] = dep.harness.start(
            name.replace("supernode", "site-exec", 1),
            site_exec_argv(f"127.0.0.1:{port}", parent_pid=node.popen.pid, auth_secret_file=secret),
            env,
        )
    return node


def start_intruders(dep: Deployment) -> None:
    """The three nodes that must be refused: an unregistered key, no CA, another federation's
    CA (the last two with a registered key: only TLS can stop them)."""
    (rogue,) = add_site_keys(dep.keys.out_dir, ["rogue"]).values()
    other_ca = make_federation(dep.work / "other-federation", sites=["x"]).ca_cert
    a_key = dep.keys.sites[SITES[0]].private_key
    for name, ca, key in (
        ("rogue", rogue.ca_cert, rogue.private_key),
        ("no-ca", None, a_key),
        ("wrong-ca", other_ca, a_key),
    ):
        argv = supernode_argv(
            dep.address, root_certificates=ca, private_key=key,
            node_config=f"site='{SITES[0]}' value=100.0", extra=("--max-retries", "1"),
        )  # fmt: skip
        dep.intruders[name] = dep.harness.start(
            f"supernode-{name}", argv, base_env(dep.work / "intruders" / name / "flwr-home")
        )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The federation of docs/deployment.md, up to its run (step 6, fixture full_run), plus
    the nodes that must be refused and the fourth site's key, registered (the last test)."""
    work = tmp_path_factory.mktemp("deploy")
    harness = Harness(work)
    try:
        dep = guide_federation(harness, work)
        start_intruders(dep)
        add_site_keys(dep.keys.out_dir, [VICTIM])
        register_sites(dep, [VICTIM])
        dep.superlink.wait_for(r"Activated node_id=", STARTUP_S, count=len(SITES))
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


def run_info(dep: Deployment, run_id: int) -> dict:
    """The run's entry in ``flwr list`` (``status`` is e.g. ``finished:completed``)."""
    listing = flwr_json(["list", CONNECTION, "--run-id", str(run_id)], dep.admin_env, dep.work)
    return listing["runs"][0]  # type: ignore[index,return-value]


def finish(dep: Deployment, run_id: int, timeout: float) -> dict:
    """Wait for the SuperLink to log the run's end, then check its status via the CLI."""
    try:
        dep.superlink.wait_for(rf"Finished task \d+ of run {run_id}\b", timeout)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{dep.harness.logs()}") from err
    run = run_info(dep, run_id)
    assert run["status"] == "finished:completed", f"{run}\n{dep.harness.logs()}"
    return run


def server_log(dep: Deployment, run_id: int) -> str:
    """The ServerApp's output: it goes to the SuperLink's log store, read with ``flwr log``."""
    res = dep.flwr("log", str(run_id), CONNECTION, "--show")
    return res.stdout + res.stderr


# ------------------------------------------------------------ docs/deployment.md as written
GUIDE = REPO / "docs" / "deployment.md"
ROLES = ("settings", "admin workstation", "coordinating server", "each site")
STEP6_SETS = ("data-format", "min-nodes", "run-name")  # what the guide's run sets itself
# systemctl, played by the test: the guide's requests are written down, and the test starts
# each unit's ExecStart as systemd would (start_requested_units).
SYSTEMCTL = 'systemctl() { printf "%s\\n" "$*" >> "$GUIDE_SYSTEMCTL"; }\n'


def experiment() -> str:
    """The guide's ``EXPERIMENT`` as the test sets it: RUN_CONFIG less what step 6 sets
    itself (the same values), so that the guide's run is the reference of the resumed one."""
    return config_text({k: v for k, v in RUN_CONFIG.items() if k not in STEP6_SETS})


def guide_blocks(text: str) -> list[tuple[str, str]]:
    """The guide's runnable blocks, in order: (where it runs, its text); a ```bash block is
    one when its first line names where it runs (``# admin workstation``, ...)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        first = block.splitlines()[0].lstrip("# ").strip()
        role = next((r for r in ROLES if first.startswith(r)), None)
        if role:
            out.append((role, block))
    return out


def guide_machines(work: Path, port: int) -> dict[str, dict[str, str]]:
    """The environment of each machine's shell: the guide's settings pointed at folders under
    ``work``, 127.0.0.1 and free ports (the admin works on the server: the same folders)."""
    common = {
        **os.environ,
        "HOME": str(work / "home"),
        "FEDSKIN_USER": getpass.getuser(),
        "FEDSKIN_VENV": str(BIN.parent),
        "FEDSKIN_SRC": str(work / "src"),
        "FLWR_HOME": str(work / "admin" / "flwr-home"),
        "SERVER": "127.0.0.1",
        "LISTEN": "127.0.0.1",
        "PORT": str(port),
        "EXPERIMENT": experiment(),
    }
    server = {
        "FEDSKIN_ETC": str(work / "server" / "etc"),
        "FEDSKIN_VAR": str(work / "server" / "var"),
        "SYSTEMD_DIR": str(work / "server" / "systemd"),
    }
    machines = {"admin": {**common, **server}, "server": {**common, **server}}
    for site in SITES:
        root = work / "sites" / site  # Deployment.site_dir
        machines[site] = {
            **common,
            "FEDSKIN_ETC": str(root / "etc"),
            "FEDSKIN_VAR": str(root / "var"),
            "SYSTEMD_DIR": str(root / "systemd"),
            "SITE": site,
            "DATA": str(root / "data"),
            "RUNTIME_PORT": str(free_port()),
        }
    return machines


def start_unit(harness: Harness, machine: str, path: Path, env: dict[str, str]) -> Proc:
    """What ``systemctl start`` does with the installed unit: its ExecStart, with the
    environment systemd gives a service (its default PATH, HOME, then the unit's Environment=
    and EnvironmentFile=), in its WorkingDirectory. One torch thread per process, as the
    sites share this machine's 2 cores; the server's units first (SERVER_PRIORITY).

    The code a site has installed is the release (``FEDSKIN_SRC``, on PYTHONPATH), as after
    ``pip install "$FEDSKIN_SRC"``: this venv's editable install is the checkout, which may
    change while the test runs, and a site serves only the FAB equal to its installed code."""
    unit = read_unit(path)
    user = getpass.getuser()
    base = {"PATH": SYSTEMD_PATH, "HOME": env["HOME"], "USER": user, "LOGNAME": user}
    base |= {"LANG": "C.UTF-8", "PYTHONPATH": env["FEDSKIN_SRC"]}
    env = unit_environment(unit, base | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    (cwd,) = unit_value(unit, "Service", "WorkingDirectory")
    priority = SERVER_PRIORITY if machine == "server" else 0
    argv = unit_command(unit, env)
    return harness.start(f"{machine}-{path.stem}", argv, env, Path(cwd), priority)


def start_requested_units(
    harness: Harness, machine: str, env: dict[str, str], requests: Path
) -> list[Proc]:
    """Start every unit the block asked systemctl to ``enable --now`` (its daemon-reload
    needs nothing here); anything else the guide asked of systemctl fails the test."""
    started = []
    lines = requests.read_text().splitlines() if requests.exists() else []
    requests.unlink(missing_ok=True)
    for line in lines:
        words = line.split()
        if words == ["daemon-reload"]:
            continue
        assert words[:2] == ["enable", "--now"], f"the test does not play `systemctl {line}`"
        for name in words[2:]:
            unit = Path(env["SYSTEMD_DIR"]) / name
            started.append(start_unit(harness, machine, unit, env))
    return started


def run_guide_block(
    harness: Harness, role: str, machine: str, text: str, env: dict[str, str], cwd: Path
) -> str:
    """One block in ``bash -eu -o pipefail`` (``text`` starts with the settings block); the
    units it enables started; the SuperLink waited for (the guide: ready when its log says
    Uvicorn running); its output kept in ``logs/``."""
    requests = cwd / f"systemctl-requests-{machine}"
    res = subprocess.run(
        ["bash", "-eu", "-o", "pipefail", "-c", SYSTEMCTL + text],
        env={**env, "GUIDE_SYSTEMCTL": str(requests)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    output = res.stdout + res.stderr
    logs = harness.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"guide-{machine}-{len(list(logs.glob(f'guide-{machine}-*')))}.log"
    log.write_text(output)
    assert res.returncode == 0, f"{role} ({machine}) exited {res.returncode}:\n{output}\n" + (
        harness.logs()
    )
    for proc in start_requested_units(harness, machine, env, requests):
        if proc.name.endswith("fedskin-superlink"):
            proc.wait_for(r"Uvicorn running on https://127\.0\.0\.1", STARTUP_S)
    return output


def guide_federation(harness: Harness, work: Path) -> Deployment:
    """docs/deployment.md from key generation to its run (step 6, left to fixture full_run):
    every block in the guide's order, a site's blocks once per site. What the test provides
    is what the guide assumes is there: the release (``FEDSKIN_SRC``), each site's images,
    the folder systemd reads units from, the key folder carried to each machine (here the
    same folder)."""
    port = free_port()
    machines = guide_machines(work, port)
    pooled = make_pooled_data(work / "pooled", [*SITES, VICTIM])
    release = copy_project(work / "src")
    shutil.copytree(REPO / "docs" / "systemd", release / "docs" / "systemd")
    for name, env in machines.items():
        Path(env["SYSTEMD_DIR"]).mkdir(parents=True, exist_ok=True)
        if name in SITES:
            write_site_folder(pooled, name, Path(env["DATA"]))
    (work / "home").mkdir()
    blocks = guide_blocks(GUIDE.read_text())
    (settings,) = [text for role, text in blocks if role == "settings"]
    *steps, (last, run_block) = [(r, t) for r, t in blocks if r != "settings"]
    assert last == "admin workstation" and "flwr run" in run_block, run_block
    where = {"admin workstation": ["admin"], "coordinating server": ["server"]}
    outputs = []
    for role, text in steps:
        on = where.get(role, SITES if role == "each site" else [])
        with ThreadPoolExecutor(len(on)) as pool:  # the sites are machines of their own
            args = [(harness, role, m, settings + text, machines[m], work) for m in on]
            done = list(pool.map(lambda a: run_guide_block(*a), args))
            outputs += [(role, machine, out) for machine, out in zip(on, done, strict=True)]
    units = {p.name: p for p in harness.procs}
    return Deployment(
        harness=harness,
        work=work,
        keys=plan(work / "federation-keys", [*SITES, VICTIM]),
        port=port,
        admin_env=base_env(Path(machines["admin"]["FLWR_HOME"])),
        superlink=units["server-fedskin-superlink"],
        supernodes={s: units[f"{s}-fedskin-supernode"] for s in SITES},
        intruders={},
        launchers={s: units[f"{s}-fedskin-site-exec"] for s in SITES},
        guide=GuideSteps(settings, machines, outputs, run_block, release, pooled),
    )


def test_the_guide_ran_as_written(deployment: Deployment, full_run: FullRun) -> None:
    """Every block ran where it says (the checks of its run: test_fedskin_apps_two_rounds),
    the units it installed are the processes of the federation, the files are where it put
    them, private ones 0600."""
    guide = deployment.guide
    assert guide is not None
    ran = [(role, machine) for role, machine, _ in guide.outputs]
    assert ran[0] == ("admin workstation", "admin") and ran[-1] == ran[0], ran
    assert {m for _, m in ran} == {"admin", "server", *SITES}, ran
    assert sorted(p.name for p in deployment.harness.procs if "fedskin-" in p.name) == sorted(
        ["server-fedskin-superlink"]
        + [f"{s}-fedskin-{u}" for s in SITES for u in ("supernode", "site-exec")]
    )
    server = Path(guide.machines["server"]["FEDSKIN_ETC"])
    assert stat.S_IMODE((server / "superlink" / "server.key").stat().st_mode) == 0o600
    for site in SITES:
        etc = Path(guide.machines[site]["FEDSKIN_ETC"]) / "site"
        assert stat.S_IMODE((etc / "supernode.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((etc / "superexec.secret").stat().st_mode) == 0o600
        assert (etc / "manifest.csv").is_file()  # fedskin partition --site, at the site
    assert full_run.out == Path(guide.machines["server"]["FEDSKIN_VAR"]) / "runs" / "first"


def test_the_guide_shows_each_version(deployment: Deployment, full_run: FullRun) -> None:
    """The server logs its version at start, each site its own; the same code everywhere
    (the ServerApp runs from the FAB, each site the installed ClientApp): no site is named
    as running another version."""
    mine = version()
    assert f"fedskin {mine}" in full_run.server_log, full_run.server_log
    assert "runs fedskin" not in full_run.server_log, full_run.server_log
    for site in SITES:
        assert f"site {site}: fedskin {mine}" in deployment.launchers[site].text()


# ------------------------------------------------------------------------------ tests
def test_superlink_serves_tls_and_requires_registered_nodes(deployment: Deployment) -> None:
    text = deployment.superlink.text()
    assert "Uvicorn running on https://" in text  # TLS, not plain HTTP
    assert "SuperNode authentication is disabled" not in text
    assert deployment.guide is not None
    var = Path(deployment.guide.machines["server"]["FEDSKIN_VAR"])
    assert (var / "state.db").is_file()  # state survives restarts
    assert len(nodes_online(deployment)) == len(SITES)


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
# Smallest configuration that still learns: the cost of a run is Flower's polling and the
# ServerApp's start, and, at the default SuperNode, one ClientApp process per message
# (~5-13 CPU-s each), not the training itself.
RUN_CONFIG: dict[str, object] = {
    "model": "test_efficientnet",
    "image-size": 16,
    "num-server-rounds": 2,
    "batch-size": 16,
    "local-epochs": 2,
    "loss": "ce",
    "augment": False,
    "amp": False,
    "channels-last": False,
    "data-format": "ham-dataverse",
    "min-nodes": 3,  # wait for every site before round 1 ...
    "min-train-nodes": 3,  # ... and aggregate only when all of them trained
    "run-name": "deploy-test",
}
RUN_TIMEOUT = 900.0  # one run on a loaded 2-core machine
HELD = "hospital-c"  # the site whose launcher is paused so that flwr stop lands mid-round 2
TRAIN_MSG = r"\[RUN {run}[^\]]*\][^\n]*\n(?:[^\n]*\n){{0,2}}?[^\n]*Receiving: train message"
SENT_MSG = r"\[RUN {run}[^\]]*\][^\n]*\n(?:[^\n]*\n){{0,2}}?[^\n]*Sending: train message"


def run_config(out: Path, **overrides: object) -> str:
    """``--run-config`` text: the test configuration, ``out-dir`` and any overrides."""
    return config_text({**RUN_CONFIG, **overrides, "out-dir": str(out)})


def config_text(cfg: dict[str, object]) -> str:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        return f"'{v}'" if isinstance(v, str) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in cfg.items())


def copy_project(dest: Path) -> Path:
    """The fedskin app as a site would have it installed, minus ``[tool.flwr.federations]``.

    ``flwr run`` on a project that still has that legacy section migrates it into the
    Flower config *and rewrites pyproject.toml*; a copy keeps the checkout untouched.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", ".*")
    for pkg in ("server", "client", "common", "simulations"):
        if (REPO / pkg).is_dir():
            shutil.rmtree(dest / pkg, ignore_errors=True)  # a fresh copy of the checkout
            shutil.copytree(REPO / pkg, dest / pkg, ignore=ignore)
    lines, keep = [], True
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("["):
            keep = not line.strip("[] ").startswith("tool.flwr.federations")
        if keep:
            lines.append(line)
    (dest / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return dest


@dataclass
class Pooled:
    """A synthetic HAM10000 folder split into one part per site (the sites' own images)."""

    root: Path
    rows: dict[str, object]  # site -> its manifest rows (pandas DataFrame)


def make_pooled_data(root: Path, sites: list[str] = SITES) -> Pooled:
    """About 100 images per site (at least two sites)."""
    from common.data.partition import partition
    from common.data.sources import load_source
    from common.data.synth import synthesize

    pooled = synthesize("ham-dataverse", root, n_images=100 * len(sites), image_size=16)
    source = load_source("ham-dataverse", pooled)
    manifest = partition(source.meta, "iid", classes=source.classes, num_sites=len(sites), seed=0)
    names = sorted(manifest["site"].astype(str).unique())
    assert len(names) == len(sites), names
    rows = {}
    for name, site in zip(names, sites, strict=True):
        part = manifest[manifest["site"].astype(str) == name].copy()
        part["site"] = site
        rows[site] = part
    return Pooled(pooled, rows)


def write_site_data(dep: Deployment, pooled: Pooled, sites: list[str] | None = None) -> None:
    """One HAM10000 folder per site (default: every started SuperNode's) holding only that
    site's images, plus its manifest."""
    from common.data.partition import write_manifest

    for site in list(dep.supernodes) if sites is None else sites:
        write_site_folder(pooled, site, dep.site_dir(site) / "data")
        write_manifest(pooled.rows[site], dep.site_dir(site) / "manifest.csv")


def write_site_folder(pooled: Pooled, site: str, data: Path) -> None:
    """``site``'s own HAM10000 folder (its images and their metadata rows) at ``data``."""
    import pandas as pd

    meta = pd.read_csv(pooled.root / "HAM10000_metadata.csv", dtype=str)
    images = {p.stem: p for p in pooled.root.rglob("*.jpg")}
    rows = pooled.rows[site]
    (data / "images").mkdir(parents=True, exist_ok=True)
    meta[meta["image_id"].isin(rows["image_id"])].to_csv(  # type: ignore[index]
        data / "HAM10000_metadata.csv", index=False
    )
    for image_id in rows["image_id"]:  # type: ignore[index]
        shutil.copy(images[image_id], data / "images" / f"{image_id}.jpg")


def checkpoint(run_dir: Path) -> dict | None:
    """``last.pt`` of a run, or None while there is none (or it cannot be read yet)."""
    import torch

    try:
        return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    except Exception:  # noqa: BLE001 - absent, or caught mid-write: ask again later
        return None


def checkpoint_round(run_dir: Path) -> int | None:
    ck = checkpoint(run_dir)
    return int(ck["state"]["round"]) if ck else None


def metrics_rounds(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.json"
    return [r["round"] for r in json.loads(path.read_text())["rounds"]] if path.is_file() else []


# ------------------------------------------------------------------- the three runs
# One after the other on the module's federation, as a real consortium serves its runs:
# the uninterrupted run, the same run stopped and resumed (compared with the first), and
# last a run that a fourth site joins and during which it is killed.
@dataclass
class Apps:
    work: Path
    app: Path  # the fedskin project as every machine has it installed


@pytest.fixture(scope="module")
def apps(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Apps:
    """The fourth site's data folder and the project the admin launches runs from: the
    release the sites have installed (start_unit)."""
    assert deployment.guide is not None
    write_site_data(deployment, deployment.guide.pooled, [VICTIM])
    return Apps(tmp_path_factory.mktemp("fedskin"), deployment.guide.release)


FORKED = re.compile(r"task \d+: ClientApp pid (\d+)$", re.M)
EXITED = re.compile(r"ClientApp pid (\d+) exited (-?\d+) after")


def launcher_children(dep: Deployment) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Per warm site, what its launcher logged: the ClientApp pids it forked (in order) and
    the exit code of each one it reaped."""
    out = {}
    for site, proc in dep.launchers.items():
        text = proc.text()
        out[site] = (FORKED.findall(text), dict(EXITED.findall(text)))
    return out


@dataclass
class FullRun:
    out: Path
    children: dict[str, tuple[list[str], dict[str, str]]]  # launcher_children after the run
    server_log: str  # flwr run --stream: the ServerApp's log


@pytest.fixture(scope="module")
def full_run(deployment: Deployment) -> FullRun:
    """docs/deployment.md, step 6, as written: two rounds, three sites, nothing goes wrong;
    the reference for the resumed run. The module's first run: every ClientApp its launchers
    forked so far was one of it."""
    guide = deployment.guide
    assert guide is not None
    admin = guide.machines["admin"]
    text = guide.settings + guide.run_block
    log = run_guide_block(
        deployment.harness, "admin workstation", "admin", text, admin, deployment.work
    )
    guide.outputs.append(("admin workstation", "admin", log))
    (run_id,) = re.findall(r"Successfully started run (\d+)", log)
    finish(deployment, int(run_id), RUN_TIMEOUT)
    out = Path(admin["FEDSKIN_VAR"]) / "runs" / "first"

    def reaped() -> dict | None:  # a child is logged when reaped, up to 0.2 s after it exits
        children = launcher_children(deployment)
        return children if all(len(f) == len(e) for f, e in children.values()) else None

    try:
        children = poll_until("the launchers to reap their ClientApps", reaped, 30, 0.2)
    except TimeoutError:
        children = launcher_children(deployment)  # the test says what is missing
    return FullRun(out, children, log)  # type: ignore[arg-type]


def freeze(proc: Proc) -> None:
    """SIGSTOP a process and everything it started (the process first: it forks no more)."""
    os.kill(proc.popen.pid, signal.SIGSTOP)
    proc.signal_all(signal.SIGSTOP)


def resume_scenario(dep: Deployment, app: Path, out: Path) -> dict[str, object]:
    """The same run: launch, ``flwr stop`` while round 2 trains, relaunch with ``resume=true``.

    A warm site answers a message within about a second: so that the stop surely lands
    mid-round, one site (``HELD``) is slow, its launcher paused (SIGSTOP) from the end of
    round 1 until the run is stopped; its SuperNode stays online and keeps round 2's train
    message, which the others have answered, and round 2 cannot end without it."""
    alive = dep.superlink.alive
    run_a = launch(dep, app, run_config(out))
    # Its ServerApp creates out/checkpoints first thing; it is the SuperLink's only one.
    poll_until("the ServerApp", (out / "checkpoints").is_dir, STARTUP_S, alive=alive)
    (server_pid,) = poll_until(
        "the ServerApp process", lambda: dep.superlink.processes("flwr-serverapp"), 30, 0.2
    )  # type: ignore[misc]
    server_start = start_time(server_pid)
    assert server_start is not None

    held = dep.launchers[HELD]
    poll_until("last.pt of round 1", lambda: checkpoint_round(out) == 1, RUN_TIMEOUT, 0.1, alive)
    freeze(held)  # last.pt is written once round 1's evaluation is in: HELD owes nothing
    try:
        # Round 2 is under way once a site received the run's second train message.
        round2 = re.compile(TRAIN_MSG.format(run=run_a))
        poll_until(
            "round 2's train message at a site",
            lambda: any(len(round2.findall(p.text())) >= 2 for p in dep.supernodes.values()),
            RUN_TIMEOUT,
            0.2,
            alive,
        )
        round_at_stop = checkpoint_round(out)
        stop = dep.flwr("stop", str(run_a), CONNECTION, "--format", "json")

        def finished() -> str:
            status = str(run_info(dep, run_a)["status"])
            return status if status.startswith("finished") else ""

        status = poll_until("the stopped status", finished, 60, 1.0, alive)
        poll_until(
            "the stopped ServerApp to exit",
            lambda: not alive_since(server_pid, server_start),
            120,
            0.2,
            alive,
        )
    finally:
        held.signal_all(signal.SIGCONT)
    after_stop = {"round": checkpoint_round(out), "metrics_rounds": metrics_rounds(out)}
    log_a = server_log(dep, run_a)
    # HELD may now run the stopped run's round 2: the new run queues behind.
    run_b = launch(dep, app, run_config(out, resume=True))
    finish(dep, run_b, RUN_TIMEOUT)
    return {
        "stop": stop,
        "status": status,
        "round_at_stop": round_at_stop,
        "after_stop": after_stop,
        "log_a": log_a,
        "log_b": server_log(dep, run_b),
    }


def kill_scenario(dep: Deployment, app: Path, out: Path) -> dict[str, object]:
    """A fourth site joins (Flower's default SuperNode); SIGKILL it while its ClientApp trains;
    the round must finish with the others."""
    victim = start_site(dep, VICTIM, site_node_config(dep.work, VICTIM, 4.0), warm=False)
    cfg = {
        "num-server-rounds": 1,
        "min-nodes": len(SITES) + 1,  # the ServerApp waits for the victim to join
        "min-train-nodes": len(SITES),
        "round-timeout": 300.0,
    }
    run_id = launch(dep, app, run_config(out, **cfg))
    # Mid-round: the victim has received the train message and runs a ClientApp for it.
    victim.wait_for(
        TRAIN_MSG.format(run=run_id) + r"[^\n]*\n(?:[^\n]*\n){0,4}?[^\n]*Received successfully",
        RUN_TIMEOUT,
    )
    clientapps = poll_until(
        "the victim's ClientApp", lambda: victim.processes("flwr-clientapp"), 60, 0.1
    )
    replied = re.compile(SENT_MSG.format(run=run_id))
    replied_before = len(replied.findall(victim.text()))
    victim.signal_all(signal.SIGKILL)
    poll_until("the victim to die", victim.done, 30, 0.1)
    run = finish(dep, run_id, RUN_TIMEOUT)
    return {
        "status": run["status"],
        "clientapps": clientapps,
        "replies_before_kill": replied_before,
        "replies_after_kill": len(replied.findall(victim.text())),
        "log": server_log(dep, run_id),
    }


def test_fedskin_apps_two_rounds_three_sites(
    full_run: FullRun, apps: Apps, deployment: Deployment
) -> None:
    out = full_run.out
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert sorted(record["train"]) == SITES, record  # every site trained every round
        assert sorted(record["validation"]["sites"]) == SITES
        assert not record["failures"] and not record["rejected"]
    assert sorted(metrics["test"]["sites"]) == SITES
    # The global model improved: the final model (last checkpoint, written on the server)
    # has a lower cross-entropy than the seeded initial model on the sites' training images.
    initial, final = _pooled_train_loss(deployment, out, apps.work / "loss-cache")
    assert final < initial, (initial, final)
    check_network_json(out)
    # Step 5b: every message (a query, a train and an evaluate message per round, the test)
    # ran in a child its site's launcher forked, each exited 0, no flwr-clientapp started.
    assert sorted(full_run.children) == SITES
    for site, (forked, exits) in full_run.children.items():
        assert len(forked) == 6 and exits == {pid: "0" for pid in forked}, (site, forked, exits)
        assert "Start `flwr-clientapp` process" not in deployment.supernodes[site].text()


def test_stopped_server_resumes_to_the_same_model(
    full_run: FullRun, apps: Apps, deployment: Deployment
) -> None:
    """``flwr stop`` mid-round 2, relaunch with ``resume=true``: the uninterrupted result."""
    out = apps.work / "resumed"
    r = resume_scenario(deployment, apps.app, out)
    logs = f"{r['log_a']}\n----- resumed run -----\n{r['log_b']}"
    assert r["stop"].returncode == 0, r["stop"]  # type: ignore[attr-defined]
    assert r["status"] == "finished:stopped", r["status"]
    # Stopped while round 2 was in progress: round 1 was saved, round 2 never was.
    assert r["round_at_stop"] == 1
    assert r["after_stop"] == {"round": 1, "metrics_rounds": [1]}, (r["after_stop"], logs)
    assert "resuming after round 1" in str(r["log_b"]), logs
    metrics = json.loads((out / "metrics.json").read_text())
    assert [rec["round"] for rec in metrics["rounds"]] == [1, 2]
    assert all(sorted(rec["train"]) == SITES for rec in metrics["rounds"])
    assert sorted(metrics["test"]["sites"]) == SITES

    reference = checkpoint(full_run.out)["arrays"]  # type: ignore[index]
    resumed = checkpoint(out)["arrays"]  # type: ignore[index]
    assert reference.keys() == resumed.keys()
    differ = [k for k in reference if not torch_equal(reference[k], resumed[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run: {differ[:5]}"


def torch_equal(a: object, b: object) -> bool:
    import torch

    return bool(torch.equal(a, b))  # type: ignore[arg-type]


def test_supernode_killed_mid_round(apps: Apps, deployment: Deployment) -> None:
    """SIGKILL a site's SuperNode while it trains: the round completes with the others.

    The killed site stays down until the SecAgg+ test after it restarts it."""
    import torch

    out = apps.work / "killed"
    r = kill_scenario(deployment, apps.app, out)
    survivors = SITES
    assert r["clientapps"], "the victim's ClientApp was not running when it was killed"
    assert r["replies_before_kill"] == r["replies_after_kill"] == 0, r
    assert r["status"] == "finished:completed"
    metrics = json.loads((out / "metrics.json").read_text())  # type: ignore[operator]
    (round1,) = metrics["rounds"]
    assert round1["aggregated"] and sorted(round1["train"]) == survivors, round1
    assert list(round1["failures"]) == [VICTIM], round1
    # The SuperLink answered for the dead node (missed heartbeats) and the failure still
    # names the site, not the SuperLink that sent the error.
    assert "Node Unavailable" in round1["failures"][VICTIM], round1["failures"]
    assert sorted(round1["validation"]["sites"]) == survivors
    assert list(round1["validation"]["failures"]) == [VICTIM]
    assert sorted(metrics["test"]["sites"]) == survivors
    weights = checkpoint(out)["arrays"]  # type: ignore[index]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    log = str(r["log"])
    assert any(VICTIM in line and "round 1" in line for line in log.splitlines()), log


def _pooled_train_loss(dep: Deployment, run_dir: Path, cache: Path) -> tuple[float, float]:
    """Cross-entropy of the initial and the final global model over all sites' train split."""
    import numpy as np
    import torch

    from common.config import RunConfig
    from common.data.site_data import load_site
    from common.models import build_model, get_weights, set_weights
    from common.train import predict
    from server.server_app import initial_model

    cfg = {"model": "test_efficientnet", "seed": 0, "pretrained": "", "dp": False}
    images, labels = [], []
    for site in SITES:
        root = dep.site_dir(site)
        run = RunConfig.from_mapping(
            {
                "data-format": "ham-dataverse", "data-path": str(root / "data"),
                "manifest": str(root / "etc" / "site" / "manifest.csv"),
                "cache-dir": str(cache / site), "image-size": 16,
            }
        )  # fmt: skip
        data = load_site(run, {"site": site})
        images.append(data.images["train"])
        labels.append(data.labels["train"])
    x, y = torch.from_numpy(np.concatenate(images)), np.concatenate(labels)
    losses = []
    first = initial_model(RunConfig.from_mapping(cfg), 7)
    for state in (get_weights(first), checkpoint(run_dir)["arrays"]):  # type: ignore[index]
        model = build_model("test_efficientnet", 7)
        set_weights(model, state)
        probs = np.asarray(predict(model, x, device=torch.device("cpu")))
        losses.append(float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()))
    return losses[0], losses[1]


# ------------------------------------------------------------------ SecAgg+ with a dropout
# Each SecAgg+ round is four train messages to every sampled site: setup (public keys),
# share-keys (encrypted shares), collect (train, masked vector), unmask (shares).
SECAGG_STAGES = 4


def guide_secagg_lines() -> tuple[str, str]:
    """docs/deployment.md's SecAgg+ lines: what a hospital adds to its node config, and what
    the admin adds to the run config."""
    text = GUIDE.read_text()
    node = re.search(r"state-dir='\$FEDSKIN_VAR/state' (require-secure-aggregation[^\"]*)\"", text)
    run = re.search(r"--run-config \"(secure-aggregation='secagg\+'[^\"]*?) out-dir=", text)
    assert node and run, "docs/deployment.md lost its SecAgg+ lines"
    return node.group(1), run.group(1)


def secagg_kill_scenario(dep: Deployment, app: Path, out: Path) -> dict[str, object]:
    """The fourth site restarts warm (step 5b) with the guide's ``require-secure-aggregation``
    node config; a two-round SecAgg+ run over the four; the fourth site drops once it has
    received round 2's collect message (its key-exchange reply reached the server) and before
    it sends its masked vector: its launcher (and the ClientApp it forked) SIGKILLed, its
    SuperNode SIGTERMed: it deactivates at once and the SuperLink answers for it without
    waiting for its heartbeats to expire (that wait is test_supernode_killed_mid_round's)."""
    node_extra, run_extra = guide_secagg_lines()
    assert dep.guide is not None
    node_config = f"{site_node_config(dep.work, VICTIM, 4.0)} {node_extra}"
    victim = start_site(
        dep, VICTIM, node_config, warm=True, name="supernode-secagg-d", installed=dep.guide.release
    )
    launcher = dep.launchers[VICTIM]
    cfg = {"min-nodes": len(SITES) + 1, "min-train-nodes": len(SITES), "round-timeout": 300.0}
    run_id = launch(dep, app, f"{run_config(out, **cfg)} {run_extra}")
    # Round 2's third train message (collect) received: the server had its share-keys reply.
    victim.wait_for(TRAIN_MSG.format(run=run_id), RUN_TIMEOUT, count=SECAGG_STAGES + 3)
    deactivated = len(re.findall(r"Deactivated node_id=", dep.superlink.text()))
    launcher.signal_all(signal.SIGKILL)  # no masked vector can be computed any more
    victim.signal_all(signal.SIGTERM)
    poll_until("the victim to die", lambda: victim.done() and launcher.done(), 30, 0.1)
    dep.superlink.wait_for(r"Deactivated node_id=", 30, count=deactivated + 1)
    sent = len(re.findall(SENT_MSG.format(run=run_id), victim.text()))
    run = finish(dep, run_id, RUN_TIMEOUT)
    return {
        "status": run["status"],
        "sent": sent,
        "node_config": node_config,
        "log": server_log(dep, run_id),
    }


def test_secagg_round_completes_without_a_site_killed_after_the_key_exchange(
    apps: Apps, deployment: Deployment
) -> None:
    """Two SecAgg+ rounds over TLS with node auth: round 1 sums all four sites (one requires
    SecAgg+), round 2 the three that survive the fourth's death after the key exchange.

    After test_supernode_killed_mid_round (the fourth site restarts here); last in the module."""
    out = apps.work / "secagg"
    r = secagg_kill_scenario(deployment, apps.app, out)
    assert r["status"] == "finished:completed", r
    assert "require-secure-aggregation=true" in str(r["node_config"])
    # It answered round 1's four stages and round 2's setup and key exchange, no more.
    assert r["sent"] == SECAGG_STAGES + 2, r
    metrics = json.loads((out / "metrics.json").read_text())
    round1, round2 = metrics["rounds"]
    everyone = sorted([*SITES, VICTIM])
    # Round 1: the site that requires SecAgg+ took part; the sum of all four was unmasked.
    assert round1["aggregated"] and sorted(round1["train"]) == everyone, round1
    assert sorted(round1["sampled"]) == everyone and not round1["failures"], round1
    # Round 2: all four sampled, the victim dead after the key exchange, the survivors'
    # aggregate adopted.
    assert round2["aggregated"] and sorted(round2["train"]) == SITES, round2
    assert sorted(round2["sampled"]) == everyone, round2
    assert list(round2["failures"]) == [VICTIM] and not round2["rejected"], round2
    assert sorted(round2["validation"]["sites"]) == SITES
    weights = checkpoint(out)["arrays"]  # type: ignore[index]
    assert int(checkpoint(out)["state"]["round"]) == 2  # type: ignore[index]
    assert all(v.isfinite().all() for v in weights.values() if v.is_floating_point())
    # The ServerApp's log names the dropped site, in round 2's secure aggregation.
    named = [
        line
        for line in str(r["log"]).splitlines()
        if VICTIM in line and "round 2" in line and "secure aggregation" in line
    ]
    assert named, r["log"]
