"""``fed-iotlm certs``: files Flower accepts, private keys private, nothing overwritten."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fed_iotlm.cli import main
from fed_iotlm.federation.certs import ExistingFilesError, Layout, generate


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _verify(layout: Layout, name: x509.GeneralName) -> None:
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(name)
    verifier.verify(leaf, [])


def test_generate_writes_what_flower_loads(tmp_path):
    layout = Layout(tmp_path / "certs")
    written = generate(layout.root, sites=["site-0", "lab.b"])
    assert set(written) == set(layout.targets(["site-0", "lab.b"], tls=True))

    # the TLS chain verifies for every default host, and only for those
    for name in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ):
        _verify(layout, name)
    with pytest.raises(VerificationError):
        _verify(layout, x509.DNSName("example.org"))

    # site keys: OpenSSH private key (flower-supernode) and public key (flwr supernode
    # register), a NIST curve, and the two halves belong together
    for site in ("site-0", "lab.b"):
        private = load_ssh_private_key(layout.site_key(site).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        registered = try_load_public_key(layout.site_pub(site))
        assert registered == public_key_to_bytes(private.public_key())
        assert layout.site_pub(site).read_text().strip().endswith(site)

    for private in (layout.ca_key, layout.server_key, layout.site_key("site-0")):
        assert _mode(private) == 0o600, private
    for public in (layout.ca_cert, layout.server_cert, layout.site_pub("site-0")):
        assert _mode(public) & 0o077 != 0o077  # readable beyond the owner (umask-dependent)
    assert not list(layout.root.rglob("*.tmp")), "a temp file was left behind"


def test_existing_files_are_never_replaced_without_force(tmp_path):
    layout = Layout(tmp_path)
    generate(tmp_path, sites=["a"])
    before = {p: p.read_bytes() for p in layout.targets(["a"], tls=True)}
    with pytest.raises(ExistingFilesError) as err:
        generate(tmp_path, sites=["a", "b"])
    assert layout.ca_key in err.value.paths
    assert not layout.site_key("b").exists()  # nothing written, not even the new site
    assert {p: p.read_bytes() for p in before} == before

    generate(tmp_path, sites=["a"], force=True)
    assert layout.ca_key.read_bytes() != before[layout.ca_key]
    assert _mode(layout.ca_key) == 0o600


def test_custom_hosts_and_bad_names(tmp_path):
    generate(tmp_path / "x", hosts=["superlink.example.org", "10.0.0.5"], sites=[])
    _verify(Layout(tmp_path / "x"), x509.DNSName("superlink.example.org"))
    with pytest.raises(ValueError, match="site name"):
        generate(tmp_path / "y", sites=["../evil"])
    with pytest.raises(ValueError, match="duplicate"):
        generate(tmp_path / "y", sites=["a", "a"])
    assert not (tmp_path / "y").exists()


def test_cli(tmp_path, capsys):
    root = tmp_path / "c"
    assert main(["certs", str(root), "--sites", "2", "--host", "localhost"]) == 0
    out = capsys.readouterr().out.split()
    assert str(root / "sites" / "site-1.pub") in out and str(root / "ca.key") in out

    # a second run refuses; --sites-only adds a site later without touching the CA
    assert main(["certs", str(root)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    ca = (root / "ca.pem").read_bytes()
    assert main(["certs", str(root), "--sites-only", "--site", "site-9"]) == 0
    assert (root / "sites" / "site-9.key").exists() and (root / "ca.pem").read_bytes() == ca
    assert main(["certs", str(root), "--sites-only", "--sites", "0"]) == 2
