"""Key material for a real Flower deployment across hospital sites (``fedskin deploy``).

One call creates everything a federation needs before the first process starts:

* a private certificate authority (CA) that every SuperNode and the ``flwr`` CLI trust,
* the SuperLink's TLS certificate, signed by that CA, valid for the given host names / IPs,
* one SuperNode authentication key pair per site.

The formats are the ones Flower 1.41 reads (checked against its source):
``flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` take PEM files;
``flower-supernode --auth-supernode-private-key`` is parsed with
``cryptography``'s ``load_ssh_private_key`` and must be an EC key (OpenSSH private-key
format); ``flwr supernode register <public key>`` parses an OpenSSH public key on a NIST
curve. We use P-384, the curve Flower itself generates.

Files are grouped by the machine they go to, so hospital IT copies one folder per machine
and cannot mix up a private key. Nothing existing is overwritten unless asked to.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console
from rich.table import Table

from common.rundir import atomic_write

DEFAULT_SERVER_NAMES: list[str] = ["localhost", "127.0.0.1", "::1"]
# Site names become file and folder names and `--node-config site='...'` values.
_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CURVE = ec.SECP384R1


@dataclass(frozen=True)
class SiteKeys:
    """One site's SuperNode authentication key pair and its self-contained bundle folder."""

    site: str
    folder: Path
    private_key: Path  # OpenSSH EC private key -> flower-supernode --auth-supernode-private-key
    public_key: Path  # OpenSSH public key -> flwr supernode register
    ca_cert: Path  # copy of the CA certificate -> flower-supernode --root-certificates


@dataclass(frozen=True)
class FederationFiles:
    """Paths of everything :func:`make_federation` wrote."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    server_ca_cert: Path  # copy of the CA certificate inside the superlink/ bundle
    sites: dict[str, SiteKeys] = field(default_factory=dict)
    readme: Path | None = None

    def rows(self) -> list[tuple[str, str, str]]:
        """(file, what it is, where it goes) for every file, for tables and the README."""
        rel = self.out_dir
        out = [
            (self.ca_cert, "CA certificate (public)", "stays with the CA key (copies below)"),
            (self.ca_key, "CA private key", "offline, admin only; never copied"),
            (self.server_cert, "SuperLink TLS certificate", "SuperLink server"),
            (self.server_key, "SuperLink TLS private key", "SuperLink server only"),
            (self.server_ca_cert, "CA certificate", "SuperLink server and admin workstation"),
        ]
        for keys in self.sites.values():
            out += [
                (keys.private_key, f"{keys.site} SuperNode private key", f"{keys.site} only"),
                (keys.public_key, f"{keys.site} SuperNode public key", "register on SuperLink"),
                (keys.ca_cert, "CA certificate", f"{keys.site}"),
            ]
        return [(str(p.relative_to(rel)), what, where) for p, what, where in out]


def _validate_sites(sites: list[str]) -> None:
    if not sites:
        raise ValueError("give at least one site name")
    bad = [s for s in sites if not _SITE_RE.match(s)]
    if bad:
        raise ValueError(
            f"invalid site name(s) {bad}: use letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (max 64 chars)"
        )
    dupes = sorted({s for s in sites if sites.count(s) > 1})
    if dupes:
        raise ValueError(f"duplicate site name(s): {dupes}")
    if "superlink" in sites or "ca" in sites:
        raise ValueError("'superlink' and 'ca' are reserved folder names, not site names")


def _san_entries(server_names: list[str]) -> list[x509.GeneralName]:
    """IP literals become IP SANs, everything else DNS SANs (TLS clients check the right one)."""
    if not server_names:
        raise ValueError("give at least one server host name or IP for the certificate")
    entries: list[x509.GeneralName] = []
    for name in server_names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write a file; private keys are created 0600 so they are never briefly world-readable.

    The bytes go to a new temporary file beside ``path`` (``O_EXCL | O_NOFOLLOW``: never an
    existing file or a link's target), renamed over ``path``: a symbolic link there is
    replaced, never followed (:func:`_refuse_links` refuses one before anything is written).
    """
    atomic_write(path, data, mode=0o600 if private else 0o644)


def _refuse_links(out_dir: Path, targets: list[Path]) -> None:
    """No output file, and no folder between ``out_dir`` and it, may be a symbolic link:
    a (dangling) link would put a private key wherever it points."""
    for target in targets:
        rel = target.relative_to(out_dir)
        p = out_dir
        for part in rel.parts:
            p = p / part
            if p.is_symlink():
                raise ValueError(f"refusing to write through a symbolic link: {p}")


def _make_ca(days: int, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedskin federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedskin federation CA"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server_names: list[str],
    days: int,
    now: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(_CURVE())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(server_names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _plan(out_dir: Path, sites: list[str]) -> FederationFiles:
    """Where every file goes: one folder per destination machine."""
    sl = out_dir / "superlink"
    return FederationFiles(
        out_dir=out_dir,
        ca_cert=out_dir / "ca" / "ca.crt",
        ca_key=out_dir / "ca" / "ca.key",
        server_cert=sl / "server.crt",
        server_key=sl / "server.key",
        server_ca_cert=sl / "ca.crt",
        sites={
            s: SiteKeys(
                site=s,
                folder=out_dir / "sites" / s,
                private_key=out_dir / "sites" / s / "supernode.key",
                public_key=out_dir / "sites" / s / "supernode.pub",
                ca_cert=out_dir / "sites" / s / "ca.crt",
            )
            for s in sites
        },
        readme=out_dir / "README.txt",
    )


def _readme(files: FederationFiles, server_names: list[str], days: int) -> str:
    width = max(len(r[0]) for r in files.rows())
    table = "\n".join(f"  {f:<{width}}  {what}  ->  {where}" for f, what, where in files.rows())
    return f"""fedskin federation key material (valid {days} days)
SuperLink certificate host names / IPs: {", ".join(server_names)}

Which file goes where
{table}

Copy rules
  * ca/ca.key is the federation's root of trust: keep it offline; it is only needed to
    issue a new server certificate. It never goes to any server or site.
  * superlink/ goes to the SuperLink server only (server.key must stay there).
  * sites/<site>/ goes to that site only; supernode.key never leaves that site.
  * sites/<site>/supernode.pub is public: the federation admin registers it with
    flwr supernode register sites/<site>/supernode.pub <connection>
  * ca.crt is public: every site and the admin's `flwr` config trust it.

Starting a site (docs/deployment.md, steps 5 and 5b)
  flower-supernode --superlink <host>:<port> --root-certificates ca.crt \\
      --auth-supernode-private-key supernode.key --node-config "site='<site>' ..." \\
      --port 9094 --isolation process
  fedskin site-exec --runtime-api-address 127.0.0.1:9094
  The second process imports torch/timm once for all messages. Without --isolation
  process and site-exec, Flower starts a fresh ClientApp process (and its imports) for
  every message.

See docs/deployment.md for the full step-by-step guide.
"""


def _write_site_keys(keys: SiteKeys, ca_pem: bytes) -> None:
    """A fresh P-384 key pair in the OpenSSH formats Flower reads, plus the CA certificate."""
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(keys.private_key, private, private=True)
    _write(keys.public_key, public + f" fedskin-{keys.site}\n".encode(), private=False)
    _write(keys.ca_cert, ca_pem, private=False)


def make_federation(
    out_dir: Path,
    *,
    server_names: list[str] | None = None,
    sites: list[str],
    days: int = 365,
    overwrite: bool = False,
) -> FederationFiles:
    """Create the CA, SuperLink TLS certificate and per-site SuperNode keys under ``out_dir``.

    Raises ``FileExistsError`` (listing every clash, writing nothing) when any target file
    exists and ``overwrite`` is False, so re-running never silently replaces keys already
    handed out to hospitals.
    """
    out_dir = Path(out_dir)
    server_names = list(DEFAULT_SERVER_NAMES if server_names is None else server_names)
    _validate_sites(list(sites))
    _san_entries(server_names)  # validate before touching the disk
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")

    files = _plan(out_dir, list(sites))
    targets = [out_dir / r[0] for r in files.rows()] + [files.readme]
    _refuse_links(out_dir, [p for p in targets if p is not None])
    existing = [str(p) for p in targets if p is not None and os.path.lexists(p)]
    if existing and not overwrite:
        raise FileExistsError(
            "refusing to overwrite existing key material (pass overwrite=True / --overwrite "
            f"to replace it): {existing}"
        )

    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = _make_ca(days, now)
    server_key, server_cert = _make_server_cert(ca_key, ca_cert, server_names, days, now)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.ca_cert, ca_pem, private=False)
    _write(files.server_key, _pem_key(server_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_ca_cert, ca_pem, private=False)
    for keys in files.sites.values():
        _write_site_keys(keys, ca_pem)
    assert files.readme is not None
    _write(files.readme, _readme(files, server_names, days).encode(), private=False)
    return files


def add_site_keys(
    out_dir: Path, sites: list[str], *, overwrite: bool = False
) -> dict[str, SiteKeys]:
    """Add SuperNode keys for new sites to an existing federation folder (CA unchanged).

    Site keys are not signed by the CA, so a hospital can join later without re-issuing
    anything the other sites hold; its bundle gets a copy of the existing CA certificate.
    """
    out_dir = Path(out_dir)
    _validate_sites(list(sites))
    ca_cert = out_dir / "ca" / "ca.crt"
    if not ca_cert.is_file():
        raise FileNotFoundError(
            f"{ca_cert} not found: create the federation first (make_federation / fedskin deploy)"
        )
    planned = _plan(out_dir, list(sites)).sites
    outputs = [p for k in planned.values() for p in (k.private_key, k.public_key, k.ca_cert)]
    _refuse_links(out_dir, outputs)
    clash = [str(p) for p in outputs if os.path.lexists(p)]
    if clash and not overwrite:
        raise FileExistsError(
            f"refusing to overwrite existing site keys (pass overwrite=True): {clash}"
        )
    ca_pem = ca_cert.read_bytes()
    for keys in planned.values():
        _write_site_keys(keys, ca_pem)
    return planned


def deploy_cli(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the key material into.")],
    site: Annotated[
        list[str],
        typer.Option("--site", "-s", help="Site name (repeat once per hospital)."),
    ],
    server_name: Annotated[
        list[str] | None,
        typer.Option(
            "--server-name",
            help="Host name or IP the sites use to reach the SuperLink (repeatable). "
            f"Default: {' '.join(DEFAULT_SERVER_NAMES)}.",
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the certificates in days.")] = 365,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing keys (old ones stop working).")
    ] = False,
    add_sites: Annotated[
        bool,
        typer.Option(
            "--add-sites", help="Only add keys for new sites to an existing federation folder."
        ),
    ] = False,
) -> None:
    """Create the CA, SuperLink certificate and one SuperNode key pair per site."""
    console = Console()
    try:
        if add_sites:
            added = add_site_keys(out_dir, site, overwrite=overwrite)
            rows = [
                (str(p.relative_to(out_dir)), what, where)
                for k in added.values()
                for p, what, where in (
                    (k.private_key, f"{k.site} SuperNode private key", f"{k.site} only"),
                    (k.public_key, f"{k.site} SuperNode public key", "register on SuperLink"),
                    (k.ca_cert, "CA certificate", k.site),
                )
            ]
            readme = out_dir / "README.txt"
        else:
            files = make_federation(
                out_dir,
                server_names=server_name or None,
                sites=site,
                days=days,
                overwrite=overwrite,
            )
            rows, readme = files.rows(), files.readme
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=1) from err
    table = Table(title=f"Federation key material in {out_dir}")
    table.add_column("file")
    table.add_column("what")
    table.add_column("goes to")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"Copy rules: {readme}; guide: docs/deployment.md")
