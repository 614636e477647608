"""Certificates for the TLS tests (DICOM TLS, HTTPS of the worklist): made with `cryptography`, never downloaded."""

from __future__ import annotations

import datetime
from pathlib import Path


def self_signed(tmp_path: Path) -> tuple[dict[str, tuple[str, str]], str]:
    """A test CA and a server and a client certificate signed by it (EC P-256, SAN localhost): ({"server": (pem,
    key), "client": (pem, key)}, ca.pem path), written into `tmp_path`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def make(cn, issuer_key=None, issuer_name=None, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                .sign(issuer_key or key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = make("test-ca", ca=True)
    paths = {}
    for who in ("server", "client"):
        key, cert = make(who, ca_key, ca_cert.subject)
        (tmp_path / f"{who}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                                serialization.NoEncryption()))
        (tmp_path / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[who] = (str(tmp_path / f"{who}.pem"), str(tmp_path / f"{who}.key"))
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return paths, str(tmp_path / "ca.pem")
