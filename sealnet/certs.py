"""`sealnet certs`: a private CA plus server and client certificates for mTLS between the services.

The trusted module only listens on TCP with mutual TLS; the runtime (and any other caller) presents a
client certificate signed by this CA, and its common name is the caller identity used for lockout.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sealnet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name,
           days: int, *, is_ca: bool = False, server_hosts: tuple[str, ...] = (), client: bool = False
           ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(ca_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if server_hosts:
        names: list[x509.GeneralName] = []
        for host in server_hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def write_certs(directory: Path, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                clients: tuple[str, ...] = ("runtime",), days: int = 365, force: bool = False) -> list[Path]:
    """Create ca.crt/ca.key, server.crt/server.key and client-<name>.crt/.key for each client name."""
    directory = Path(directory)
    if (directory / "ca.key").exists() and not force:
        raise FileExistsError(f"{directory}/ca.key exists; refusing to replace the CA (pass --force)")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("sealnet private CA")
    written = []

    def save(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        _write_key(directory / f"{stem}.key", key)
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written.extend([directory / f"{stem}.crt", directory / f"{stem}.key"])

    save("ca", ca_key, _issue("sealnet private CA", ca_key, ca_key, ca_name, days, is_ca=True))
    server_key = ec.generate_private_key(ec.SECP256R1())
    save("server", server_key, _issue("sealnet trusted module", server_key, ca_key, ca_name, days,
                                      server_hosts=hosts))
    for name in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        save(f"client-{name}", key, _issue(name, key, ca_key, ca_name, days, client=True))
    return written
