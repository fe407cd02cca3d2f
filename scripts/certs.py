"""TLS certificates and SuperNode authentication keys for a fedmllm deployment (Flower 1.42).

    python scripts/certs.py tls DIR [--san HOST ...]   # DIR/ca.pem, ca.key, server.pem, server.key
    python scripts/certs.py node-keys DIR N            # DIR/node-<i>.key (+ .pub) for i < N

The server certificate is valid for 127.0.0.1, ::1 and localhost plus every --san (the SuperLink's
host names or IP addresses as SuperNodes and `flwr` dial them). SuperNodes and `flwr` verify it
with ca.pem. Node keys are EC P-384 in OpenSSH format, as `flower-supernode
--auth-supernode-private-key` and `flwr supernode register` expect. Needs only `cryptography`
(a Flower dependency). Existing files are left alone: delete them to make new ones.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAYS = 365


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write `data`; a private key is created 0600 (never readable by others, not even for the
    moment between writing and a chmod)."""
    if not private:
        path.write_bytes(data)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_tls(out: Path, sans: list[str]) -> list[Path]:
    """A CA and a server certificate signed by it, valid for localhost and `sans`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / n for n in ("ca.pem", "ca.key", "server.pem", "server.key")]
    now = dt.datetime.now(dt.timezone.utc)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmllm deployment CA")])
    names = list(dict.fromkeys(["127.0.0.1", "::1", "localhost", *sans]))
    if all(p.exists() for p in paths):
        have = _cert_names(paths[2])
        if all(n in have for n in names):
            return paths
        # a new --san on an existing directory: the same CA (nodes keep trusting it), a new server cert
        names = list(dict.fromkeys([*have, *names]))
        print(f"re-issuing {paths[2]} for {', '.join(n for n in names if n not in have)} (CA kept)", file=sys.stderr)
        ca_key = serialization.load_pem_private_key(paths[1].read_bytes(), password=None)
        _write(paths[3], _key_pem(key := ec.generate_private_key(ec.SECP384R1())), private=True)
        _write(paths[2], _server_cert(names, key, ca_key, ca_name, now).public_bytes(serialization.Encoding.PEM))
        return paths
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _server_cert(names, key, ca_key, ca_name, now)
    _write(paths[0], ca.public_bytes(serialization.Encoding.PEM))
    _write(paths[1], _key_pem(ca_key), private=True)
    _write(paths[2], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths[3], _key_pem(key), private=True)
    return paths


def _cert_names(path: Path) -> list[str]:
    """The subject alternative names of a certificate, as strings."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.get_values_for_type(x509.IPAddress)] + ext.get_values_for_type(x509.DNSName)


def _server_cert(names, key, ca_key, ca_name, now):
    """The server certificate for `names`, signed by the CA."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def make_node_keys(out: Path, n: int, first: int = 0) -> list[Path]:
    """EC P-384 OpenSSH key pairs node-<i>.key / node-<i>.key.pub for i in [first, first + n)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(first, first + n):
        path = out / f"node-{i}.key"
        if not path.exists():
            key = ec.generate_private_key(ec.SECP384R1())
            _write(
                path,
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
                ),
                private=True,
            )
            pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            _write(path.with_name(path.name + ".pub"), pub + f" fedmllm-node-{i}\n".encode())
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="scripts/certs.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tls", help="CA + server certificate")
    t.add_argument("dir", type=Path)
    t.add_argument(
        "--san", action="append", default=[], help="a host name or IP the SuperLink is reached at (repeatable)"
    )
    k = sub.add_parser("node-keys", help="SuperNode authentication key pairs")
    k.add_argument("dir", type=Path)
    k.add_argument("n", type=int, help="how many nodes (node-0 .. node-<n-1>)")
    k.add_argument("--first", type=int, default=0, help="index of the first key (default 0)")
    args = p.parse_args(argv)
    if args.cmd == "tls":
        paths = make_tls(args.dir, args.san)
    else:
        if args.n < 1:
            p.error(f"n={args.n}: give the number of SuperNodes (>= 1)")
        paths = make_node_keys(args.dir, args.n, args.first)
    print("\n".join(str(x) for x in paths))


if __name__ == "__main__":
    sys.exit(main())
