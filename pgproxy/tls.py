"""TLS contexts for both sides, built from the settings (and rebuilt on RELOAD).

Client side (apps → pgproxy) answers an SSLRequest with 'S' and a TLS handshake when
``client_tls_sslmode`` is not ``disable``; ``require`` refuses clients that did not ask,
``verify-ca``/``verify-full`` also want a client certificate signed by ``client_tls_ca_file``.
Server side (pgproxy → PostgreSQL) sends an SSLRequest unless ``server_tls_sslmode`` is
``disable``/``allow``, and verifies PostgreSQL's certificate in the verify modes. TLS 1.2 is
the oldest version either side accepts.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
from dataclasses import dataclass

from pgproxy.config import ConfigError, Settings, SslMode

ALPN = "postgresql"  # PostgreSQL 17's protocol name


log = logging.getLogger("pgproxy.tls")


@dataclass(frozen=True, slots=True)
class ServerTls:
    """How pgproxy asks PostgreSQL for TLS: ``context`` None means never."""

    mode: SslMode
    context: ssl.SSLContext | None

    @property
    def required(self) -> bool:
        """A server that refuses TLS must not be used."""
        return self.mode in ("require", "verify-ca", "verify-full")


def _load(context: ssl.SSLContext, what: str, action: object, *paths: str) -> None:
    try:
        action(*paths)  # type: ignore[operator]
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ConfigError(f"{what}: cannot load {', '.join(paths)}: {reason}") from None


def client_context(settings: Settings) -> ssl.SSLContext | None:
    """The context for clients' TLS, or None when client_tls_sslmode is disable."""
    mode = settings.client_tls_sslmode
    if mode == "disable":
        return None
    if not settings.client_tls_cert_file or not settings.client_tls_key_file:
        raise ConfigError(
            f"client_tls_sslmode = {mode} needs client_tls_cert_file and client_tls_key_file"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(
        context,
        "client_tls_cert_file",
        context.load_cert_chain,
        settings.client_tls_cert_file,
        settings.client_tls_key_file,
    )
    if settings.client_tls_ca_file:
        _load(
            context,
            "client_tls_ca_file",
            context.load_verify_locations,
            settings.client_tls_ca_file,
        )
        # A client certificate is asked for and, if sent, verified (hba's cert method
        # reads its name); the verify modes below make it mandatory.
        context.verify_mode = ssl.CERT_OPTIONAL
    if mode in ("verify-ca", "verify-full"):
        if not settings.client_tls_ca_file:
            raise ConfigError(f"client_tls_sslmode = {mode} needs client_tls_ca_file")
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols([ALPN])
    return context


def server_tls(settings: Settings) -> ServerTls:
    """How servers are asked for TLS."""
    mode = settings.server_tls_sslmode
    if mode in ("disable", "allow"):
        return ServerTls(mode, None)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = mode == "verify-full"
    if mode in ("verify-ca", "verify-full"):
        if settings.server_tls_ca_file:
            _load(
                context, "server_tls_ca_file", context.load_verify_locations,
                settings.server_tls_ca_file,
            )  # fmt: skip
        else:
            context.load_default_certs()
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE  # prefer/require: encryption, no identity check
    if settings.server_tls_cert_file and settings.server_tls_key_file:
        _load(
            context,
            "server_tls_cert_file",
            context.load_cert_chain,
            settings.server_tls_cert_file,
            settings.server_tls_key_file,
        )
    elif settings.server_tls_cert_file or settings.server_tls_key_file:
        # (The console sets one at a time, as PgBouncer's does: no error in between.)
        log.warning("server_tls_cert_file and server_tls_key_file go together: neither is used")
    return ServerTls(mode, context)


# Signature algorithms whose hash tls-server-end-point uses as is (RFC 5929 4.1: MD5 and
# SHA-1 are replaced by SHA-256, which is also the hash of the commonest signatures).
_SIGNATURE_HASHES = (
    (bytes.fromhex("06092a864886f70d01010c"), "sha384"),  # sha384WithRSAEncryption
    (bytes.fromhex("06092a864886f70d01010d"), "sha512"),  # sha512WithRSAEncryption
    (bytes.fromhex("06082a8648ce3d040303"), "sha384"),  # ecdsa-with-SHA384
    (bytes.fromhex("06082a8648ce3d040304"), "sha512"),  # ecdsa-with-SHA512
)


_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.DOTALL
)


def certificate_hash(cert_file: str) -> bytes:
    """tls-server-end-point channel binding data: the hash of pgproxy's own certificate
    (the first in the file), for SCRAM-SHA-256-PLUS."""
    try:
        with open(cert_file, encoding="ascii", errors="replace") as pem:
            text = pem.read()
        # (openssl ca writes a text dump of the certificate before its PEM block.)
        block = _PEM_CERTIFICATE.search(text)
        if block is None:
            raise ValueError("no PEM certificate in it")
        der = ssl.PEM_cert_to_DER_cert(block.group())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"client_tls_cert_file: cannot read {cert_file}: {exc}") from None
    algorithm = next((name for oid, name in _SIGNATURE_HASHES if oid in der), "sha256")
    return hashlib.new(algorithm, der).digest()
