"""Key material from ``server.deploy``: validated with the same parsers Flower uses."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
import typer
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

from server.deploy import FederationFiles, add_site_keys, deploy_cli, make_federation

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
        (["a", "a"], "duplicate"),
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


def test_deploy_cli(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(deploy_cli)
    runner = CliRunner()
    out = tmp_path / "keys"
    args = [str(out), "--site", "a", "--site", "b", "--server-name", "fl.example.org"]
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
    assert "refusing to overwrite" in again.output
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


def test_deploy_cli_add_sites(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(deploy_cli)
    out = tmp_path / "keys"
    runner = CliRunner()
    assert runner.invoke(app, [str(out), "--site", "a"]).exit_code == 0
    res = runner.invoke(app, [str(out), "--site", "b", "--add-sites"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "sites/b/supernode.key" in res.output
    assert (out / "sites" / "b" / "supernode.pub").is_file()
