"""Key material for a real Flower deployment across hospital sites (``fedskin deploy``).

``fedskin deploy init`` (:func:`make_federation`) creates everything a federation needs
before the first process starts:

* a private certificate authority (CA) that every SuperNode and the ``flwr`` CLI trust,
* the SuperLink's TLS certificate, signed by that CA, valid for the given host names / IPs,
* one SuperNode authentication key pair per site (server/deploy_certs.py: the formats).

``fedskin deploy add-site`` (:func:`add_site_keys`) adds a site's key pair later.

Files are grouped by the machine they go to, so hospital IT copies one folder per machine
and cannot mix up a private key. Nothing existing is overwritten unless asked to. Every
write goes through server/deploy_io.py (no symbolic link followed, keys 0600 from their
creation). ``add-site`` copies ``ca/ca.crt`` to new sites only once it is shown to be this
federation's CA (:func:`check_ca`: its fingerprint recorded at creation, the CA key, the
SuperLink certificate it issued): a replaced ``ca.crt`` is refused, naming it.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.deploy_certs import (
    fingerprint_of,
    make_ca,
    make_server_cert,
    normal_fingerprint,
    pem_cert,
    pem_key,
    same_key,
    san_entries,
    site_key_pair,
)
from server.deploy_io import KeyFolders, read_regular, refuse_links

DEFAULT_SERVER_NAMES: list[str] = ["localhost", "127.0.0.1", "::1"]
# Site names become file and folder names and `--node-config site='...'` values.
SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SiteKeys:
    """One site's SuperNode authentication key pair and its self-contained bundle folder."""

    site: str
    folder: Path
    private_key: Path  # OpenSSH EC private key -> flower-supernode --auth-supernode-private-key
    public_key: Path  # OpenSSH public key -> flwr supernode register
    ca_cert: Path  # copy of the CA certificate -> flower-supernode --root-certificates

    def rows(self) -> list[tuple[Path, str, str]]:
        return [
            (self.private_key, f"{self.site} SuperNode private key", f"{self.site} only"),
            (self.public_key, f"{self.site} SuperNode public key", "register on SuperLink"),
            (self.ca_cert, "CA certificate", self.site),
        ]


@dataclass(frozen=True)
class FederationFiles:
    """Paths of everything :func:`make_federation` wrote."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    ca_fingerprint: Path  # SHA-256 of ca.crt: what add-site checks ca.crt against
    server_cert: Path
    server_key: Path
    server_ca_cert: Path  # copy of the CA certificate inside the superlink/ bundle
    sites: dict[str, SiteKeys] = field(default_factory=dict)
    readme: Path | None = None

    def rows(self) -> list[tuple[str, str, str]]:
        """(file, what it is, where it goes) for every file, for tables and the README."""
        out = [
            (self.ca_cert, "CA certificate (public)", "stays with the CA key (copies below)"),
            (self.ca_key, "CA private key", "offline, admin only; never copied"),
            (self.ca_fingerprint, "CA certificate fingerprint", "stays with the CA certificate"),
            (self.server_cert, "SuperLink TLS certificate", "SuperLink server"),
            (self.server_key, "SuperLink TLS private key", "SuperLink server only"),
            (self.server_ca_cert, "CA certificate", "SuperLink server and admin workstation"),
        ]
        for keys in self.sites.values():
            out += keys.rows()
        return [(str(p.relative_to(self.out_dir)), what, where) for p, what, where in out]


def validate_sites(sites: list[str]) -> None:
    """One line naming every bad, duplicate or reserved site name."""
    if not sites:
        raise ValueError("give at least one site name (--site NAME)")
    bad = [s for s in sites if not SITE_RE.match(s)]
    if bad:
        raise ValueError(
            f"invalid site name(s) {', '.join(map(repr, bad))}: use letters, digits, '-', '_' "
            "or '.', starting with a letter or digit (max 64 chars)"
        )
    dupes = sorted({s for s in sites if sites.count(s) > 1})
    if dupes:
        raise ValueError(f"site name(s) given twice: {', '.join(dupes)}")
    if "superlink" in sites or "ca" in sites:
        raise ValueError("'superlink' and 'ca' are reserved folder names, not site names")


def plan(out_dir: Path, sites: list[str]) -> FederationFiles:
    """Where every file goes: one folder per destination machine."""
    sl = out_dir / "superlink"

    def site_keys(s: str) -> SiteKeys:
        folder = out_dir / "sites" / s
        return SiteKeys(
            s, folder, folder / "supernode.key", folder / "supernode.pub", folder / "ca.crt"
        )

    return FederationFiles(
        out_dir=out_dir,
        ca_cert=out_dir / "ca" / "ca.crt",
        ca_key=out_dir / "ca" / "ca.key",
        ca_fingerprint=out_dir / "ca" / "ca.fingerprint",
        server_cert=sl / "server.crt",
        server_key=sl / "server.key",
        server_ca_cert=sl / "ca.crt",
        sites={s: site_keys(s) for s in sites},
        readme=out_dir / "README.txt",
    )


def no_overwrite(out_dir: Path, targets: list[Path], overwrite: bool) -> None:
    """Refuse (one line, every clash, nothing written) when a target exists, unless asked."""
    clash = [str(p.relative_to(out_dir)) for p in targets if os.path.lexists(p)]
    if clash and not overwrite:
        raise FileExistsError(
            f"refusing to overwrite existing key material in {out_dir}: {', '.join(clash)} "
            "(give --overwrite to replace it; keys already handed out then stop working)"
        )


def _readme(files: FederationFiles, server_names: list[str], days: int, fingerprint: str) -> str:
    width = max(len(r[0]) for r in files.rows())
    table = "\n".join(f"  {f:<{width}}  {what}  ->  {where}" for f, what, where in files.rows())
    return f"""fedskin federation key material (valid {days} days)
SuperLink certificate host names / IPs: {", ".join(server_names)}
CA certificate fingerprint: {fingerprint}
  (keep it with this README: `fedskin deploy add-site --out {files.out_dir} --site NAME
  --ca-fingerprint {fingerprint}` checks ca/ca.crt against it; anyone can compare it with
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

Where each file goes on each machine, the systemd units that start the SuperLink, a
SuperNode and `fedskin site-exec`, and the commands in order: docs/deployment.md.
"""


def check_ca(out_dir: Path, fingerprint: str | None = None) -> bytes:
    """The PEM bytes of ``out_dir/ca/ca.crt`` once it is shown to be this federation's CA.

    It must be a self-signed CA certificate and agree with every record of the CA there
    is: ``fingerprint`` (given out of band, e.g. ``--ca-fingerprint`` from the README the
    admin kept), ``ca/ca.fingerprint`` (written at creation), ``ca/ca.key`` (its public
    key), ``superlink/server.crt`` (signed by it) and ``superlink/ca.crt`` (the same
    bytes). At least one of them must be there. Otherwise a ``ValueError`` of one line
    names ``ca.crt`` and what it failed.
    """
    files = plan(out_dir, [])
    path = files.ca_cert

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"{path}: refusing to copy it to new sites, it is not this federation's CA "
            f"certificate ({why})"
        )

    pem = read_regular(path)
    cert = _self_signed_ca(pem, refuse)
    public = cert.public_key()
    found = fingerprint_of(cert)
    checked = []
    if fingerprint:
        checked.append("--ca-fingerprint")
        if normal_fingerprint(fingerprint) != found:
            raise refuse(f"its fingerprint {found} is not the one given")
    if os.path.lexists(files.ca_fingerprint):
        checked.append(str(files.ca_fingerprint))
        recorded = read_regular(files.ca_fingerprint).decode("ascii", "replace")
        if normal_fingerprint(recorded) != found:
            raise refuse(f"its fingerprint {found} differs from {files.ca_fingerprint}")
    if os.path.lexists(files.ca_key):
        checked.append(str(files.ca_key))
        try:
            key = serialization.load_pem_private_key(read_regular(files.ca_key), None)
        except (ValueError, TypeError):
            raise refuse(f"{files.ca_key} is not a readable key") from None
        if not same_key(key.public_key(), public):
            raise refuse(f"its key is not the public half of {files.ca_key}")
    if os.path.lexists(files.server_cert):
        checked.append(str(files.server_cert))
        try:
            server = x509.load_pem_x509_certificate(read_regular(files.server_cert))
            server.verify_directly_issued_by(cert)
        except (ValueError, TypeError, InvalidSignature):
            raise refuse(f"{files.server_cert} was not issued by it") from None
    if os.path.lexists(files.server_ca_cert):
        checked.append(str(files.server_ca_cert))
        if read_regular(files.server_ca_cert) != pem:
            raise refuse(f"it differs from the copy {files.server_ca_cert}")
    if not checked:
        raise refuse(
            "nothing to check it against: no ca/ca.fingerprint, ca/ca.key or "
            "superlink/server.crt; pass --ca-fingerprint from the README"
        )
    return pem


def _self_signed_ca(pem: bytes, refuse) -> x509.Certificate:  # noqa: ANN001 - a closure
    """The certificate in ``pem`` if it is a self-signed EC CA certificate."""
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
        if "refusing to copy it" in str(err):
            raise
        raise refuse(f"not a PEM CA certificate: {' '.join(str(err).split())[:80]}") from None
    except (x509.ExtensionNotFound, InvalidSignature, AssertionError):
        raise refuse("not a self-signed CA certificate") from None
    return cert


def _write_site_keys(out: KeyFolders, keys: SiteKeys, ca_pem: bytes) -> None:
    """A fresh P-384 key pair in the OpenSSH formats Flower reads, plus the CA certificate."""
    private, public = site_key_pair(keys.site)
    out.write(keys.private_key, private, private=True)
    out.write(keys.public_key, public, private=False)
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
    validate_sites(list(sites))
    san_entries(server_names)  # validate before touching the disk
    if days < 1:
        raise ValueError(f"--days must be at least 1, got {days}")

    files = plan(out_dir, list(sites))
    assert files.readme is not None
    targets = [out_dir / r[0] for r in files.rows()] + [files.readme]
    refuse_links(out_dir, targets)
    no_overwrite(out_dir, targets, overwrite)

    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = make_ca(days, now)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, server_names, days, now)
    ca_pem = pem_cert(ca_cert)
    fingerprint = fingerprint_of(ca_cert)
    out = KeyFolders(out_dir)
    try:
        out.write(files.ca_key, pem_key(ca_key), private=True)
        out.write(files.ca_cert, ca_pem, private=False)
        out.write(files.ca_fingerprint, f"{fingerprint}\n".encode(), private=False)
        out.write(files.server_key, pem_key(server_key), private=True)
        out.write(files.server_cert, pem_cert(server_cert), private=False)
        out.write(files.server_ca_cert, ca_pem, private=False)
        for keys in files.sites.values():
            _write_site_keys(out, keys, ca_pem)
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
    validate_sites(list(sites))
    ca_cert = out_dir / "ca" / "ca.crt"
    if not os.path.lexists(ca_cert):
        raise FileNotFoundError(
            f"{ca_cert} not found: {out_dir} is not a federation's key folder; give --out "
            f"the folder `fedskin deploy init` wrote, or create one with "
            f"`fedskin deploy init --out {out_dir} --site NAME`"
        )
    planned = plan(out_dir, list(sites)).sites
    outputs = [p for k in planned.values() for p, _, _ in k.rows()]
    refuse_links(out_dir, outputs)
    no_overwrite(out_dir, outputs, overwrite)
    ca_pem = check_ca(out_dir, ca_fingerprint)
    out = KeyFolders(out_dir)
    try:
        for keys in planned.values():
            _write_site_keys(out, keys, ca_pem)
    finally:
        out.close()
    return planned
