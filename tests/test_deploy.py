"""Key material from ``server.deploy``: validated with the same parsers Flower uses."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from flwr.cli.supernode.register import try_load_public_key
from typer.testing import CliRunner

from server.deploy import FederationFiles, add_site_keys, make_federation
from server.deploy_cli import deploy_app
from tests.deploy_harness import read_unit, unit_command, unit_value

SITES = ["hospital-a", "hospital_b", "clinic.c"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationFiles:
    return make_federation(tmp_path_factory.mktemp("fed") / "keys", sites=SITES, days=30)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify(fed: FederationFiles, name: x509.GeneralName) -> None:
    store = Store([_cert(fed.ca_cert)])
    verifier = PolicyBuilder().store(store).build_server_verifier(name)
    verifier.verify(_cert(fed.server_cert), [])


def test_layout_and_permissions(fed: FederationFiles) -> None:
    private = [fed.ca_key, fed.server_key, *(k.private_key for k in fed.sites.values())]
    public = [fed.ca_cert, fed.server_cert, fed.server_ca_cert]
    public += [p for k in fed.sites.values() for p in (k.public_key, k.ca_cert)]
    for path in private:
        assert _mode(path) == 0o600, path
    for path in public:
        assert _mode(path) == 0o644, path
    assert sorted(fed.sites) == sorted(SITES)
    # Each bundle folder is self-contained: the CA copy equals the CA.
    for keys in fed.sites.values():
        assert keys.ca_cert.read_bytes() == fed.ca_cert.read_bytes()
        assert keys.private_key.parent == keys.folder
    assert fed.server_ca_cert.read_bytes() == fed.ca_cert.read_bytes()
    # No site folder holds another site's key or any server/CA private key.
    for keys in fed.sites.values():
        assert sorted(p.name for p in keys.folder.iterdir()) == [
            "ca.crt",
            "supernode.key",
            "supernode.pub",
        ]


def test_server_cert_chains_to_ca_for_each_san(fed: FederationFiles) -> None:
    """What a TLS client does: path validation + host name / IP check against the SANs."""
    _verify(fed, x509.DNSName("localhost"))
    _verify(fed, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    _verify(fed, x509.IPAddress(ipaddress.ip_address("::1")))
    with pytest.raises(VerificationError):
        _verify(fed, x509.DNSName("evil.example.org"))
    ca = _cert(fed.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = _cert(fed.server_cert)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The server key matches its certificate.
    key = load_pem_private_key(fed.server_key.read_bytes(), None)
    assert key.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    ) == server.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def test_custom_server_names_and_validity(tmp_path: Path) -> None:
    files = make_federation(
        tmp_path / "k", server_names=["superlink.hospital.org", "10.1.2.3"], sites=["a"], days=7
    )
    san = _cert(files.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["superlink.hospital.org"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    _verify(files, x509.DNSName("superlink.hospital.org"))
    with pytest.raises(VerificationError):
        _verify(files, x509.DNSName("localhost"))
    cert = _cert(files.server_cert)
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 7 <= days <= 8


def test_site_keys_in_flower_formats(fed: FederationFiles) -> None:
    """Parsed exactly as flower-supernode (private) and `flwr supernode register` (public) do."""
    seen = set()
    for keys in fed.sites.values():
        private = load_ssh_private_key(keys.private_key.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        public = load_ssh_public_key(keys.public_key.read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.public_numbers() == private.public_key().public_numbers()
        # Flower's own loader (NIST-curve check included) accepts it.
        registered = try_load_public_key(keys.public_key)
        assert registered and registered not in seen  # one distinct key per site
        seen.add(registered)


def test_refuses_to_overwrite_then_overwrites_on_request(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    first = make_federation(out, sites=["a", "b"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="supernode.key"):
        make_federation(out, sites=["a", "b"])
    # Even a partial clash (new site next to an old one) writes nothing.
    with pytest.raises(FileExistsError):
        make_federation(out, sites=["a", "new-site"])
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not (out / "sites" / "new-site").exists()

    second = make_federation(out, sites=["a", "b"], overwrite=True)
    assert second.sites["a"].private_key.read_bytes() != before[first.sites["a"].private_key]
    assert _mode(second.sites["a"].private_key) == 0o600


def test_overwrite_fixes_loose_permissions(tmp_path: Path) -> None:
    files = make_federation(tmp_path / "k", sites=["a"])
    files.sites["a"].private_key.chmod(0o644)
    files = make_federation(tmp_path / "k", sites=["a"], overwrite=True)
    assert _mode(files.sites["a"].private_key) == 0o600


@pytest.mark.parametrize(
    ("sites", "match"),
    [
        ([], "at least one site"),
        (["a", "a"], "given twice: a$"),
        (["../etc"], "invalid site name"),
        (["has space"], "invalid site name"),
        (["superlink"], "reserved"),
    ],
)
def test_bad_site_names(tmp_path: Path, sites: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_federation(tmp_path / "k", sites=sites)
    assert not (tmp_path / "k").exists()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="server host name"):
        make_federation(tmp_path / "k", server_names=[], sites=["a"])
    with pytest.raises(ValueError, match="days"):
        make_federation(tmp_path / "k", sites=["a"], days=0)
    assert not (tmp_path / "k").exists()


def test_readme_says_where_each_file_goes(fed: FederationFiles) -> None:
    assert fed.readme is not None
    text = fed.readme.read_text()
    for rel, _what, _where in fed.rows():
        assert rel in text
    assert "flwr supernode register" in text
    assert "offline" in text


def test_deploy_init(tmp_path: Path) -> None:
    app = deploy_app
    runner = CliRunner()
    out = tmp_path / "keys"
    args = ["init", "--out", str(out), "--site", "a", "--site", "b"]
    args += ["--server-name", "fl.example.org"]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "sites/a/supernode.key" in res.output
    assert (out / "sites" / "b" / "supernode.pub").is_file()
    san = _cert(out / "superlink" / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["fl.example.org"]

    again = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 1
    (line,) = [line for line in again.output.splitlines() if line.strip()]
    assert "refusing to overwrite" in line and "sites/b/supernode.key" in line, line
    assert "--overwrite" in line
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_add_site_keys_keeps_the_federation(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    files = make_federation(out, sites=["a"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    added = add_site_keys(out, ["late-joiner"])
    assert set(added) == {"late-joiner"}
    assert added["late-joiner"].ca_cert.read_bytes() == files.ca_cert.read_bytes()
    assert _mode(added["late-joiner"].private_key) == 0o600
    assert try_load_public_key(added["late-joiner"].public_key)
    assert {p: p.read_bytes() for p in before} == before  # nothing existing changed
    with pytest.raises(FileExistsError, match="a/supernode.key"):
        add_site_keys(out, ["a"])
    with pytest.raises(FileNotFoundError, match="ca.crt"):
        add_site_keys(tmp_path / "empty", ["b"])


def test_deploy_add_site(tmp_path: Path) -> None:
    app = deploy_app
    out = tmp_path / "keys"
    runner = CliRunner()
    assert runner.invoke(app, ["init", "--out", str(out), "--site", "a"]).exit_code == 0
    res = runner.invoke(app, ["add-site", "--out", str(out), "--site", "b"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "sites/b/supernode.key" in res.output
    assert (out / "sites" / "b" / "supernode.pub").is_file()


def test_deploy_add_site_in_the_wrong_folder_says_what_to_do(tmp_path: Path) -> None:
    """The folder given is not a federation's: one line naming the missing file and the
    command that makes one, no internal name."""
    res = CliRunner().invoke(
        deploy_app, ["add-site", "--out", str(tmp_path / "elsewhere"), "--site", "b"],
        env={"COLUMNS": "400"},
    )  # fmt: skip
    assert res.exit_code == 1
    (line,) = [line for line in res.output.splitlines() if line.strip()]
    assert line.startswith(f"error: {tmp_path / 'elsewhere' / 'ca' / 'ca.crt'} not found"), line
    assert "fedskin deploy init --out" in line and "make_federation" not in line, line
    assert not (tmp_path / "elsewhere").exists()  # nothing written


def test_deploy_needs_its_verb_and_out(tmp_path: Path) -> None:
    """The old form (the output folder as the first argument) is refused, not mistaken."""
    runner = CliRunner()
    old = runner.invoke(deploy_app, [str(tmp_path / "federation-keys"), "--site", "a"])
    assert old.exit_code == 2 and "No such command" in old.output, old.output
    no_out = runner.invoke(deploy_app, ["init", "--site", "a"])
    assert no_out.exit_code == 2 and "--out" in no_out.output, no_out.output
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ hostile neighbours
def _folder_modes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): _mode(p) for p in [out, *out.rglob("*")] if p.is_dir()}


def test_umask_000_gives_no_group_or_world_writable_folders(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        files = make_federation(tmp_path / "keys", sites=["a", "b"], days=1)
        add_site_keys(tmp_path / "keys", ["c"])
    finally:
        os.umask(old)
    modes = _folder_modes(files.out_dir)
    assert modes == {
        ".": 0o755,
        "ca": 0o700,
        "superlink": 0o700,
        "sites": 0o755,
        "sites/a": 0o700,
        "sites/b": 0o700,
        "sites/c": 0o700,
    }, modes
    for path in files.out_dir.rglob("*"):
        if path.is_file():
            assert _mode(path) in (0o600, 0o644), path
            assert _mode(path) == 0o600 or not path.name.endswith(".key"), path
    assert _mode(files.sites["a"].private_key) == _mode(files.ca_key) == 0o600


def test_overwrite_tightens_existing_private_folders(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    (out / "sites" / "a").mkdir(parents=True)
    (out / "ca").mkdir()
    os.chmod(out / "sites" / "a", 0o777)
    os.chmod(out / "ca", 0o775)
    make_federation(out, sites=["a"], days=1)
    assert _mode(out / "sites" / "a") == _mode(out / "ca") == 0o700


@pytest.mark.parametrize("where", ["sites/new", "sites", "."])
def test_a_symlink_where_a_site_folder_goes_is_refused(tmp_path: Path, where: str) -> None:
    out = tmp_path / "keys"
    make_federation(out, sites=["a"], days=1)
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    if where == ".":  # the whole output folder swapped for a link
        out.rename(tmp_path / "real")
        out.symlink_to(tmp_path / "real")
        attacker = tmp_path / "real"
        before = sorted(p.name for p in attacker.rglob("*"))
    else:
        if (out / where).exists():
            (out / where).rename(tmp_path / "moved")
        (out / where).symlink_to(attacker, target_is_directory=True)
        before = []
    with pytest.raises(ValueError, match=r"^refusing to write through a symbolic link: ") as err:
        add_site_keys(out, ["new"])
    assert "\n" not in str(err.value) and str(out / where).rstrip("/.") in str(err.value)
    assert sorted(p.name for p in attacker.rglob("*")) == before  # nothing written there


def test_a_link_swapped_in_after_the_check_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: the folder is fine when checked and a link when the key is written. The
    writes open each folder relative to its parent, O_NOFOLLOW: the link is refused."""
    from server import deploy

    out = tmp_path / "keys"
    make_federation(out, sites=["a"], days=1)
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    checked = deploy.check_ca  # the last step before the writes: every check is done

    def check_then_swap(out_dir: Path, fingerprint: str | None = None) -> bytes:
        pem = checked(out_dir, fingerprint)
        (out / "sites" / "late").symlink_to(attacker, target_is_directory=True)
        return pem

    monkeypatch.setattr(deploy, "check_ca", check_then_swap)
    with pytest.raises(ValueError, match=r"^refusing to write through a symbolic link: .*late"):
        add_site_keys(out, ["late"])
    assert not list(attacker.iterdir())
    (out / "sites" / "late").unlink()

    def swap_key(out_dir: Path, fingerprint: str | None = None) -> bytes:
        pem = checked(out_dir, fingerprint)
        (out / "sites" / "b").mkdir(mode=0o700)
        (out / "sites" / "b" / "supernode.key").symlink_to(attacker / "stolen.key")
        return pem

    monkeypatch.setattr(deploy, "check_ca", swap_key)
    with pytest.raises(ValueError, match=r"^refusing to write through a symbolic link: "):
        add_site_keys(out, ["b"])
    assert not list(attacker.iterdir())


def _other_ca(tmp_path: Path) -> FederationFiles:
    return make_federation(tmp_path / "evil", sites=["x"], days=1)


def test_add_sites_refuses_a_replaced_ca_certificate(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    files = make_federation(out, sites=["a"], days=1)
    genuine = files.ca_cert.read_bytes()
    evil = _other_ca(tmp_path)
    files.ca_cert.chmod(0o644)
    files.ca_cert.write_bytes(evil.ca_cert.read_bytes())
    with pytest.raises(ValueError) as err:
        add_site_keys(out, ["b"])
    text = str(err.value)
    assert text.startswith(f"{files.ca_cert}: refusing to copy it") and "\n" not in text
    assert not (out / "sites" / "b").exists()
    # The CA key offline and the fingerprint file replaced too: the SuperLink certificate
    # the genuine CA issued still gives it away.
    files.ca_key.unlink()
    files.ca_fingerprint.write_bytes(evil.ca_fingerprint.read_bytes())
    with pytest.raises(ValueError, match=r"ca\.crt: .*server\.crt was not issued by it"):
        add_site_keys(out, ["b"])
    # Everything local replaced: the fingerprint the admin kept from the README refuses it.
    for name in ("server.crt", "ca.crt"):
        (out / "superlink" / name).write_bytes((evil.out_dir / "superlink" / name).read_bytes())
    kept = next(
        line.split(": ", 1)[1]
        for line in files.readme.read_text().splitlines()  # type: ignore[union-attr]
        if line.startswith("CA certificate fingerprint: ")
    )
    with pytest.raises(ValueError, match=r"ca\.crt: .*is not the one given"):
        add_site_keys(out, ["b"], ca_fingerprint=kept)
    assert not (out / "sites" / "b").exists()
    # The genuine certificate back: accepted, with the fingerprint the README gave.
    files.ca_cert.write_bytes(genuine)
    for name in ("server.crt", "ca.crt"):
        (out / "superlink" / name).unlink()
    files.ca_fingerprint.unlink()
    with pytest.raises(ValueError, match="nothing to check it against"):
        add_site_keys(out, ["b"])
    added = add_site_keys(out, ["b"], ca_fingerprint=kept.upper().replace("SHA256:", ""))
    assert added["b"].ca_cert.read_bytes() == genuine


def test_add_sites_refuses_a_ca_certificate_that_is_not_one(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    files = make_federation(out, sites=["a"], days=1)
    files.ca_cert.write_bytes(files.server_cert.read_bytes())  # a leaf, not a CA
    with pytest.raises(ValueError, match=r"ca\.crt: refusing .*not an EC CA certificate"):
        add_site_keys(out, ["b"])
    files.ca_cert.write_text("garbage\n")
    with pytest.raises(ValueError, match=r"ca\.crt: refusing .*not a PEM CA certificate"):
        add_site_keys(out, ["b"])
    files.ca_cert.unlink()
    files.ca_cert.symlink_to(tmp_path / "elsewhere.crt")
    with pytest.raises(ValueError, match=r"^refusing to write through a symbolic link: .*ca\.crt"):
        add_site_keys(out, ["b"])


def test_deploy_add_site_with_a_replaced_ca_is_one_line(tmp_path: Path) -> None:
    app = deploy_app
    out = tmp_path / "keys"
    runner = CliRunner()
    assert runner.invoke(app, ["init", "--out", str(out), "--site", "a"]).exit_code == 0
    evil = _other_ca(tmp_path)
    (out / "ca" / "ca.crt").write_bytes(evil.ca_cert.read_bytes())
    args = ["add-site", "--out", str(out), "--site", "b"]
    res = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "ca.crt: refusing to copy it to new sites" in lines[0], lines
    assert not (out / "sites" / "b").exists()


# ----------------------------------------------------------- systemd units (docs/systemd)
ROOT = Path(__file__).resolve().parents[1]
UNITS = sorted((ROOT / "docs" / "systemd").glob("*.service"))
GUIDE = (ROOT / "docs" / "deployment.md").read_text()
VENV = "/opt/fedskin/venv"  # the guide's default FEDSKIN_VENV, as the shipped units say


def test_the_guide_installs_every_shipped_unit() -> None:
    assert [u.name for u in UNITS] == [
        "fedskin-site-exec.service",
        "fedskin-superlink.service",
        "fedskin-supernode.service",
    ]
    for unit in UNITS:
        assert f"install_unit {unit.name}" in GUIDE, unit.name
        assert re.search(rf"systemctl enable --now [^\n]*{re.escape(unit.name)}", GUIDE), unit


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze here")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """As the guide installs them (the venv's path in place of /opt/fedskin/venv, so that
    the programs exist): no error, no warning."""
    for unit in UNITS:
        text = unit.read_text().replace(VENV, str(Path(sys.executable).parent.parent))
        (tmp_path / unit.name).write_text(text)
    res = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res
    # The check can fail: a misspelt key is reported.
    (tmp_path / "fedskin-superlink.service").write_text(
        (tmp_path / "fedskin-superlink.service").read_text().replace("ExecStart=", "ExecStrat=")
    )
    bad = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "fedskin-superlink.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "ExecStrat" in bad.stdout + bad.stderr


def _env_file_keys(name: str) -> set[str]:
    """The keys the guide writes into ``$FEDSKIN_ETC/<name>`` (its ``cat > ... <<EOF``)."""
    (body,) = re.findall(rf'cat > "\$FEDSKIN_ETC/{re.escape(name)}" <<EOF\n(.*?)\nEOF', GUIDE, re.S)
    return {line.split("=", 1)[0] for line in body.splitlines()}


def _written_by_the_guide(path: str) -> bool:
    """``/etc/fedskin/<dir>/<file>``: the guide installs a file of that name into
    ``$FEDSKIN_ETC/<dir>/``, or writes ``$FEDSKIN_ETC/<dir>/<file>`` itself."""
    rel = Path(path).relative_to("/etc/fedskin")
    into = re.escape(f'"$FEDSKIN_ETC/{rel.parent}/"')
    installed = rf"install -m [0-7]+ [^\n]*{re.escape(rel.name)}\"? [^\n]*{into}"
    return f"$FEDSKIN_ETC/{rel}" in GUIDE or re.search(installed, GUIDE) is not None


@pytest.mark.parametrize("unit", UNITS, ids=[u.stem for u in UNITS])
def test_unit_runs_a_real_program_with_flags_it_accepts(unit: Path) -> None:
    """Parsed as systemd does: [Unit]/[Service]/[Install]; ExecStart's program is one of the
    venv's and each of its flags is in that program's ``--help``; every variable it uses is
    in the settings file the guide writes; every file it names is one the guide puts there."""
    parsed = read_unit(unit)
    assert {"Unit", "Service", "Install"} <= set(parsed), parsed.keys()
    assert unit_value(parsed, "Service", "User") == ["fedskin"]
    (env_file,) = unit_value(parsed, "Service", "EnvironmentFile")
    assert env_file.startswith("/etc/fedskin/"), env_file
    (exec_start,) = unit_value(parsed, "Service", "ExecStart")
    used = set(re.findall(r"\$\{(\w+)\}", exec_start))
    assert used and used <= _env_file_keys(Path(env_file).name), (used, env_file)
    argv = unit_command(parsed, {name: f"<{name}>" for name in used})
    program = Path(argv[0])
    assert str(program.parent) == f"{VENV}/bin", argv[0]
    command = [str(Path(sys.executable).parent / program.name)]
    command += argv[1:2] if program.name == "fedskin" else []  # fedskin site-exec
    help_text = subprocess.run(
        [*command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    ).stdout
    flags = [a for a in argv if a.startswith("--")]
    assert len(flags) >= 2, argv
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (flag, command)
    files = [a for a in argv if a.startswith("/etc/fedskin/")]
    assert files and all(_written_by_the_guide(f) for f in files), files
    for section, key in (("Service", "WorkingDirectory"), ("Install", "WantedBy")):
        assert unit_value(parsed, section, key), (section, key)
