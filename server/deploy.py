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

Writing is safe against a hostile neighbour on the same machine: every folder is opened
relative to the one above it without following links (a symbolic link anywhere from the
output folder down is refused, one line naming it, and one swapped in after the check is
not followed either), private keys are created 0600 from the start inside that folder
(``O_CREAT | O_EXCL | O_NOFOLLOW``), folders holding private keys are 0700 and the others
0755 whatever the umask. ``--add-sites`` copies ``ca/ca.crt`` to new sites only once it is
shown to be this federation's CA (its fingerprint recorded at creation, the CA key, the
SuperLink certificate it issued): a replaced ``ca.crt`` is refused, naming it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.rundir import link_refused, open_folder, open_subfolder, write_at

DEFAULT_SERVER_NAMES: list[str] = ["localhost", "127.0.0.1", "::1"]
# Site names become file and folder names and `--node-config site='...'` values.
_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CURVE = ec.SECP384R1
# Folders holding a private key (and only those) are 0700; the others 0755.
_PRIVATE_FOLDERS = ("ca", "superlink")


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
    ca_fingerprint: Path  # SHA-256 of ca.crt: what --add-sites checks ca.crt against
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
            (self.ca_fingerprint, "CA certificate fingerprint", "stays with the CA certificate"),
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


def _folder_mode(rel: tuple[str, ...]) -> tuple[int, bool]:
    """(mode, set even on an existing folder) for a folder ``rel`` below the output folder."""
    private = (len(rel) == 1 and rel[0] in _PRIVATE_FOLDERS) or (
        len(rel) == 2 and rel[0] == "sites"
    )
    return (0o700, True) if private else (0o755, False)


class _Folders:
    """The output folder's subfolders, each opened once relative to its parent without
    following links (:func:`common.rundir.open_subfolder`) and made with its mode."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._fds: dict[tuple[str, ...], int] = {}

    def fd(self, rel: tuple[str, ...]) -> int:
        if rel not in self._fds:
            if not rel:
                self._fds[rel] = open_folder(self.out_dir, follow_root=False, mode=0o755)
            else:
                mode, force = _folder_mode(rel)
                self._fds[rel] = open_subfolder(
                    self.fd(rel[:-1]),
                    rel[-1],
                    self.out_dir.joinpath(*rel),
                    mode=mode,
                    force_mode=force,
                )
        return self._fds[rel]

    def write(self, path: Path, data: bytes, *, private: bool) -> None:
        """Write a file; private keys are created 0600 so they are never briefly readable.

        The bytes go to a new temporary file (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600
        or 0644 from its creation) inside the folder fd, renamed over ``path`` in that same
        folder: a symbolic link at ``path`` is refused (so is one before the write, by
        :func:`_refuse_links`), and no link on the way is ever followed.
        """
        rel = path.parent.relative_to(self.out_dir).parts
        write_at(self.fd(rel), path.name, data, mode=0o600 if private else 0o644, shown=path)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _refuse_links(out_dir: Path, targets: list[Path]) -> None:
    """No output file, no folder between ``out_dir`` and it, nor ``out_dir`` itself may
    be a symbolic link: a (dangling) link would put a private key wherever it points.

    Checked before anything is written, so a refusal writes nothing; the writes then open
    each folder without following links, so a link swapped in after this check is refused
    too (:class:`_Folders`).
    """
    if out_dir.is_symlink():
        raise link_refused(out_dir)
    for target in targets:
        rel = target.relative_to(out_dir)
        p = out_dir
        for part in rel.parts:
            p = p / part
            if p.is_symlink():
                raise link_refused(p)


def fingerprint_of(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER bytes (what ``openssl x509 -fingerprint
    -sha256`` prints, without the colons)."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def _normal_fingerprint(text: str) -> str:
    hexdigits = text.strip().lower().removeprefix("sha256:").removeprefix("sha256=")
    return "sha256:" + hexdigits.replace(":", "").replace(" ", "")


def _read_regular(path: Path) -> bytes:
    """A file's bytes, refusing a symbolic link (never followed) or anything not a file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        if path.is_symlink():
            raise link_refused(path) from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path}: not a regular file")
        return f.read()


def _same_key(a: object, b: object) -> bool:
    def der(key: object) -> bytes:
        return key.public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return der(a) == der(b)


def check_ca(out_dir: Path, fingerprint: str | None = None) -> bytes:
    """The PEM bytes of ``out_dir/ca/ca.crt`` once it is shown to be this federation's CA.

    It must be a self-signed CA certificate and agree with every record of the CA there
    is: ``fingerprint`` (given out of band, e.g. ``--ca-fingerprint`` from the README the
    admin kept), ``ca/ca.fingerprint`` (written at creation), ``ca/ca.key`` (its public
    key), ``superlink/server.crt`` (signed by it) and ``superlink/ca.crt`` (the same
    bytes). At least one of them must be there. Otherwise a ``ValueError`` of one line
    names ``ca.crt`` and what it failed.
    """
    files = _plan(out_dir, [])
    path = files.ca_cert

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"{path}: refusing to copy it to new sites, it is not this federation's CA "
            f"certificate ({why})"
        )

    pem = _read_regular(path)
    try:
        cert = x509.load_pem_x509_certificate(pem)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        public = cert.public_key()
        if not constraints.ca or not isinstance(public, ec.EllipticCurvePublicKey):
            raise refuse("not an EC CA certificate")
        algorithm = cert.signature_hash_algorithm
        assert algorithm is not None
        public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise refuse(f"not a PEM CA certificate: {' '.join(str(err).split())[:80]}") from None
    except (x509.ExtensionNotFound, InvalidSignature, AssertionError):
        raise refuse("not a self-signed CA certificate") from None
    found = fingerprint_of(cert)
    checked = []
    if fingerprint:
        checked.append("--ca-fingerprint")
        if _normal_fingerprint(fingerprint) != found:
            raise refuse(f"its fingerprint {found} is not the one given")
    if os.path.lexists(files.ca_fingerprint):
        checked.append(str(files.ca_fingerprint))
        recorded = _read_regular(files.ca_fingerprint).decode("ascii", "replace")
        if _normal_fingerprint(recorded) != found:
            raise refuse(f"its fingerprint {found} differs from {files.ca_fingerprint}")
    if os.path.lexists(files.ca_key):
        checked.append(str(files.ca_key))
        try:
            key = serialization.load_pem_private_key(_read_regular(files.ca_key), None)
        except (ValueError, TypeError):
            raise refuse(f"{files.ca_key} is not a readable key") from None
        if not _same_key(key.public_key(), public):
            raise refuse(f"its key is not the public half of {files.ca_key}")
    if os.path.lexists(files.server_cert):
        checked.append(str(files.server_cert))
        try:
            server = x509.load_pem_x509_certificate(_read_regular(files.server_cert))
            server.verify_directly_issued_by(cert)
        except (ValueError, TypeError, InvalidSignature):
            raise refuse(f"{files.server_cert} was not issued by it") from None
    if os.path.lexists(files.server_ca_cert):
        checked.append(str(files.server_ca_cert))
        if _read_regular(files.server_ca_cert) != pem:
            raise refuse(f"it differs from the copy {files.server_ca_cert}")
    if not checked:
        raise refuse(
            "nothing to check it against: no ca/ca.fingerprint, ca/ca.key or "
            "superlink/server.crt; pass --ca-fingerprint from the README"
        )
    return pem


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
        ca_fingerprint=out_dir / "ca" / "ca.fingerprint",
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


def _readme(files: FederationFiles, server_names: list[str], days: int, fingerprint: str) -> str:
    width = max(len(r[0]) for r in files.rows())
    table = "\n".join(f"  {f:<{width}}  {what}  ->  {where}" for f, what, where in files.rows())
    return f"""fedskin federation key material (valid {days} days)
SuperLink certificate host names / IPs: {", ".join(server_names)}
CA certificate fingerprint: {fingerprint}
  (keep it with this README: `fedskin deploy --add-sites --ca-fingerprint {fingerprint}`
  checks ca/ca.crt against it; anyone can compare it with
  `openssl x509 -in ca.crt -noout -fingerprint -sha256`)

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
  fedskin site-exec --runtime-api-address 127.0.0.1:9094 --parent-pid <SuperNode pid>
  The second process imports torch/timm once for all messages, serves only that
  SuperNode and runs only the fedskin ClientApp installed at the site. Without --isolation
  process and site-exec, Flower starts a fresh ClientApp process for every message, and
  that process installs and imports the app bundle the server sends.

See docs/deployment.md for the full step-by-step guide.
"""


def _write_site_keys(out: _Folders, keys: SiteKeys, ca_pem: bytes) -> None:
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
    out.write(keys.private_key, private, private=True)
    out.write(keys.public_key, public + f" fedskin-{keys.site}\n".encode(), private=False)
    out.write(keys.ca_cert, ca_pem, private=False)


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

    fingerprint = fingerprint_of(ca_cert)
    out = _Folders(out_dir)
    try:
        out.write(files.ca_key, _pem_key(ca_key), private=True)
        out.write(files.ca_cert, ca_pem, private=False)
        out.write(files.ca_fingerprint, f"{fingerprint}\n".encode(), private=False)
        out.write(files.server_key, _pem_key(server_key), private=True)
        server_pem = server_cert.public_bytes(serialization.Encoding.PEM)
        out.write(files.server_cert, server_pem, private=False)
        out.write(files.server_ca_cert, ca_pem, private=False)
        for keys in files.sites.values():
            _write_site_keys(out, keys, ca_pem)
        assert files.readme is not None
        readme = _readme(files, server_names, days, fingerprint)
        out.write(files.readme, readme.encode(), private=False)
    finally:
        out.close()
    return files


def add_site_keys(
    out_dir: Path,
    sites: list[str],
    *,
    overwrite: bool = False,
    ca_fingerprint: str | None = None,
) -> dict[str, SiteKeys]:
    """Add SuperNode keys for new sites to an existing federation folder (CA unchanged).

    Site keys are not signed by the CA, so a hospital can join later without re-issuing
    anything the other sites hold; its bundle gets a copy of the existing CA certificate,
    once :func:`check_ca` has shown it is the federation's (a replaced ``ca/ca.crt`` is
    refused, naming it; ``ca_fingerprint`` adds the fingerprint the admin kept).
    """
    out_dir = Path(out_dir)
    _validate_sites(list(sites))
    ca_cert = out_dir / "ca" / "ca.crt"
    if not os.path.lexists(ca_cert):
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
    ca_pem = check_ca(out_dir, ca_fingerprint)
    out = _Folders(out_dir)
    try:
        for keys in planned.values():
            _write_site_keys(out, keys, ca_pem)
    finally:
        out.close()
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
    ca_fingerprint: Annotated[
        str | None,
        typer.Option(
            "--ca-fingerprint",
            help="With --add-sites: the CA fingerprint from the README (sha256:...); "
            "ca/ca.crt must match it.",
        ),
    ] = None,
) -> None:
    """Create the CA, SuperLink certificate and one SuperNode key pair per site."""
    console = Console()
    try:
        if add_sites:
            added = add_site_keys(out_dir, site, overwrite=overwrite, ca_fingerprint=ca_fingerprint)
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
    except (OSError, ValueError) as err:  # one line: the file and what is wrong
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(code=1) from err
    table = Table(title=f"Federation key material in {out_dir}")
    table.add_column("file")
    table.add_column("what")
    table.add_column("goes to")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"Copy rules: {readme}; guide: docs/deployment.md")
