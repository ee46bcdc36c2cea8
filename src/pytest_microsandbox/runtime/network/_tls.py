"""TLS interception for secret substitution: a CA created once per cache
directory (trusted by guests of sandboxes with secrets), leaf certificates
made per server name, and a TLS server over a mitmproxy_rs stream (the
guest's side of a flow is not a socket: ``ssl.MemoryBIO``).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._locks import cache_lock, cache_lock_timeout
from ..paths import cache_dir as default_cache_dir

__all__ = ["CertificateAuthority", "TlsServer", "ensure_ca", "looks_like_tls"]

_CA_DIR = "network-ca"
_VALID = datetime.timedelta(days=3650)
_READ = 65536


def looks_like_tls(first: bytes) -> bool:
    """A TLS handshake record (ClientHello) starts the flow."""
    return len(first) >= 3 and first[0] == 0x16 and first[1] == 0x03


@dataclass(frozen=True)
class CertificateAuthority:
    cert_pem: bytes
    key_pem: bytes


def ensure_ca(cache: Path | None) -> CertificateAuthority:
    """The cache directory's interception CA, created (under a lock) on first use.

    The key stays in the cache directory (mode 0600), never in a guest.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root = default_cache_dir(cache) / _CA_DIR
    cert_path, key_path = root / "ca.pem", root / "ca.key"
    if cert_path.is_file() and key_path.is_file():
        return CertificateAuthority(cert_path.read_bytes(), key_path.read_bytes())
    root.mkdir(parents=True, exist_ok=True)
    lock = cache_lock(Path(f"{root}.lock"), f"the network CA in {root}")
    lock.acquire(cache_lock_timeout(60))
    try:
        if not (cert_path.is_file() and key_path.is_file()):
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pytest-microsandbox CA")])
            now = datetime.datetime.now(datetime.timezone.utc)
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + _VALID)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True, key_cert_sign=True, crl_sign=True,
                        content_commitment=False, key_encipherment=False,
                        data_encipherment=False, key_agreement=False,
                        encipher_only=False, decipher_only=False,
                    ),
                    critical=True,
                )
                .sign(key, hashes.SHA256())
            )  # fmt: skip
            key_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            for path, data, mode in (
                (key_path, key_pem, 0o600),
                (cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644),
            ):
                fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-")
                try:
                    os.fchmod(fd, mode)
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
    finally:
        lock.release()
    return CertificateAuthority(cert_path.read_bytes(), key_path.read_bytes())


class _Leaves:
    """Server contexts with a leaf certificate per name, signed by the CA."""

    def __init__(self, ca: CertificateAuthority, workdir: Path) -> None:
        self._ca = ca
        self._dir = workdir
        self._contexts: dict[str, ssl.SSLContext] = {}

    def context(self, name: str) -> ssl.SSLContext:
        ctx = self._contexts.get(name)
        if ctx is None:
            ctx = self._contexts[name] = self._make(name)
        return ctx

    def _make(self, name: str) -> ssl.SSLContext:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        ca_cert = x509.load_pem_x509_certificate(self._ca.cert_pem)
        ca_key: Any = serialization.load_pem_private_key(self._ca.key_pem, None)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            alt = x509.DNSName(name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # ssl loads chains from files only: a private temp file, removed at once.
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".leaf-", suffix=".pem")
        try:
            os.write(fd, pem)
            os.close(fd)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tmp)
        finally:
            os.unlink(tmp)
        return ctx


class TlsServer:
    """Terminates the guest's TLS on a mitmproxy_rs stream (MemoryBIO)."""

    def __init__(self, ca: CertificateAuthority, workdir: Path) -> None:
        self._leaves = _Leaves(ca, workdir)

    async def accept(self, stream: Any, first: bytes, fallback_name: str) -> tuple[Any, str]:
        """Do the handshake (``first``: bytes already read); return the TLS
        session and the server name the guest asked for (SNI, else ``fallback_name``).

        :raises ssl.SSLError, ConnectionError: the handshake failed.
        """
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        chosen: list[str] = []

        def on_sni(obj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
            chosen.append(name or fallback_name)
            obj.context = self._leaves.context(chosen[0])

        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.sni_callback = on_sni
        # Without SNI the callback still runs (name None): it picks the fallback.
        session = base.wrap_bio(incoming, outgoing, server_side=True)
        incoming.write(first)
        while True:
            try:
                session.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    stream.write(outgoing.read())
                data = await stream.read(_READ)
                if not data:
                    raise ConnectionError("the guest closed the TLS handshake") from None
                incoming.write(data)
        if outgoing.pending:
            stream.write(outgoing.read())
        return _Session(session, incoming, outgoing, stream), chosen[0] if chosen else fallback_name


class _Session:
    """Plaintext read/write over the guest's TLS."""

    def __init__(
        self, obj: Any, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, stream: Any
    ) -> None:
        self._obj, self._in, self._out, self._stream = obj, incoming, outgoing, stream

    async def read(self, n: int) -> bytes:
        while True:
            try:
                return bytes(self._obj.read(n))
            except ssl.SSLWantReadError:
                if self._out.pending:
                    self._stream.write(self._out.read())
                data = await self._stream.read(_READ)
                if not data:
                    return b""
                self._in.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def write(self, data: bytes) -> None:
        self._obj.write(data)
        if self._out.pending:
            self._stream.write(self._out.read())

    async def drain(self) -> None:
        await self._stream.drain()

    def write_eof(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self._obj.unwrap()
        if self._out.pending:
            self._stream.write(self._out.read())
        self._stream.write_eof()

    def close(self) -> None:
        self._stream.close()
