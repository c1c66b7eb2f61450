"""Key material for a deployed federation: a CA, the SuperLink's TLS certificate, site keys.

Flower 1.41 needs two separate things for a SuperNode to join a TLS SuperLink that runs
with ``--enable-supernode-auth``:

* **TLS** (``flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``,
  ``flower-supernode --root-certificates``): a PEM server certificate whose subject
  alternative names cover every host name / IP the sites dial, signed by a CA the sites
  trust.  The CA's key never leaves the operator; the sites only get ``ca.pem``.
* **SuperNode authentication**: one EC key pair per site on a NIST curve.  The
  SuperNode reads its private key with ``load_ssh_private_key`` (OpenSSH format), and
  ``flwr supernode register`` reads the public key with ``load_ssh_public_key`` (an
  ``ecdsa-sha2-nistp384 ...`` line), so both are written in OpenSSH format.  P-384 is
  the curve Flower's documentation uses (``ssh-keygen -t ecdsa -b 384``).

Private keys are written unencrypted (Flower cannot prompt for a passphrase) and with
mode 0600; every file is written atomically, so an interrupted run never leaves a
truncated key that would later fail with an obscure parse error.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fed_iotlm.atomic import atomic_write

CURVE = ec.SECP384R1
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.pem", "superlink.key"
SITES_DIR = "sites"


@dataclass(frozen=True)
class Layout:
    """Where :func:`generate` puts each file under ``root`` (also what the docs name)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    def site_key(self, site: str) -> Path:
        return self.root / SITES_DIR / f"{site}.key"

    def site_pub(self, site: str) -> Path:
        return self.root / SITES_DIR / f"{site}.pub"

    def targets(self, sites: Iterable[str], *, tls: bool) -> list[Path]:
        """Every file a generation with these options writes."""
        out = [self.ca_cert, self.ca_key, self.server_cert, self.server_key] if tls else []
        for site in sites:
            out += [self.site_key(site), self.site_pub(site)]
        return out


class ExistingFilesError(FileExistsError):
    """Generation would overwrite key material; the caller must opt in (``--force``)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        names = ", ".join(str(p) for p in paths)
        super().__init__(f"refusing to overwrite existing key material: {names} (use --force)")


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fed-iotlm"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    # backdated a little so a site whose clock lags by minutes still accepts it
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def make_ca(
    key: ec.EllipticCurvePrivateKey, *, days: int = 3650, common_name: str = "fed-iotlm CA"
) -> x509.Certificate:
    """A self-signed CA certificate that may sign end-entity certificates only."""
    not_before, not_after = _validity(days)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )


def subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """IP addresses as iPAddress entries (TLS clients match IPs only there), others as DNS."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip().strip("[]")
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise ValueError("the server certificate needs at least one host name or IP address")
    return names


def make_server_cert(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Iterable[str],
    *,
    days: int = 825,
) -> x509.Certificate:
    """The SuperLink's TLS certificate for ``hosts``, signed by the CA."""
    hosts = list(hosts)
    sans = subject_alt_names(hosts)
    not_before, not_after = _validity(days)
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0].strip("[]")))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
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
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )


def pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, what ``flower-superlink --ssl-keyfile`` (Python's ssl) loads."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def openssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    """OpenSSH format, what ``flower-supernode --auth-supernode-private-key`` loads."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def openssh_public(key: ec.EllipticCurvePrivateKey, comment: str = "") -> bytes:
    """``ecdsa-sha2-nistp384 AAAA... comment``, what ``flwr supernode register`` loads."""
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return line + (f" {comment}".encode() if comment else b"") + b"\n"


@contextmanager
def _private_umask() -> Iterator[None]:
    """atomic_write gives the file ``0666 & ~umask`` before the rename; umask 077 makes
    that 0600, so a private key is never readable by others, not even for a moment."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` atomically; private files end up with mode 0600."""
    if private:
        with _private_umask():
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        os.chmod(path, 0o600)
    else:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def check_site_name(site: str) -> str:
    """A site name becomes a file name: keep it to letters, digits, ``-``, ``_``, ``.``."""
    if not site or site.startswith(".") or not all(c.isalnum() or c in "-_." for c in site):
        raise ValueError(f"site name {site!r}: use letters, digits, '-', '_' or '.'")
    return site


def generate(
    root: Path,
    *,
    hosts: Iterable[str] = DEFAULT_HOSTS,
    sites: Iterable[str] = (),
    tls: bool = True,
    days: int = 825,
    force: bool = False,
) -> list[Path]:
    """Write the CA, the SuperLink certificate (if ``tls``) and one key pair per site.

    Nothing is written when any target exists and ``force`` is false, so a second run
    can never silently replace a CA that sites already trust or a registered site key.
    Returns the paths written.
    """
    layout = Layout(Path(root))
    sites = [check_site_name(s) for s in sites]
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate site names in {sites}")
    hosts = list(hosts)
    if tls:
        subject_alt_names(hosts)  # validate before anything is written
    targets = layout.targets(sites, tls=tls)
    existing = [p for p in targets if p.exists() or p.is_symlink()]
    if existing and not force:
        raise ExistingFilesError(existing)
    for path in targets:  # with the caller's umask, not the private files' 077
        path.parent.mkdir(parents=True, exist_ok=True)
    if tls:
        ca_key, server_key = new_private_key(), new_private_key()
        ca_cert = make_ca(ca_key, days=max(days, 3650))
        server_cert = make_server_cert(server_key, ca_key, ca_cert, hosts, days=days)
        pem = serialization.Encoding.PEM
        write_file(layout.ca_key, pem_private(ca_key), private=True)
        write_file(layout.ca_cert, ca_cert.public_bytes(pem))
        write_file(layout.server_key, pem_private(server_key), private=True)
        write_file(layout.server_cert, server_cert.public_bytes(pem))
    for site in sites:
        key = new_private_key()
        write_file(layout.site_key(site), openssh_private(key), private=True)
        write_file(layout.site_pub(site), openssh_public(key, comment=site))
    return targets
