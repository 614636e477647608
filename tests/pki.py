"""Test certificates: a throw-away CA and a server and a client certificate signed by it (cryptography).

`self_signed(folder)` writes `ca.pem`, `server.pem`/`server.key` and `client.pem`/`client.key` (EC P-256,
valid for a day, names `localhost` and 127.0.0.1) and returns ({"server": (cert, key), "client": (cert,
key)}, ca). Used by the DICOM TLS tests (tests/network/test_receive.py), the Triton gRPC TLS test and the worklist's HTTPS test.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def self_signed(folder: Path, *, days: float = 1.0, ca_days: float = 1.0) -> tuple[dict[str, tuple[str, str]], str]:
    """`days`, `ca_days`: how long the server and client certificates, and the CA's, stay valid from now
    (negative: they ended that long ago, having been valid for a day before)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def make(cn, issuer_key=None, issuer_name=None, ca=False, days=1.0):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = datetime.datetime.now(datetime.timezone.utc)
        end = now + datetime.timedelta(days=days)
        start = min(now - datetime.timedelta(minutes=5), end - datetime.timedelta(days=1))
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .sign(issuer_key or key, hashes.SHA256()))
        return key, cert

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make("test-ca", ca=True, days=ca_days)
    paths = {}
    for who in ("server", "client"):
        key, cert = make(who, ca_key, ca_cert.subject, days=days)
        (folder / f"{who}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
        (folder / f"{who}.key").chmod(0o600)  # `dicom-node serve` refuses a world-readable key
        (folder / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[who] = (str(folder / f"{who}.pem"), str(folder / f"{who}.key"))
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return paths, str(folder / "ca.pem")
