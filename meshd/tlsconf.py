"""TLS settings for the listeners outside clients reach (the proxy endpoint, `meshd proxy
http`) and for the clients that reach them (`--via wss://`, `--ca-file`).

Rules:
- A server certificate and its key come together (`--tls-cert FILE --tls-key FILE`) or not
  at all. Before anything listens, both files are read and checked: readable, PEM, the key
  unencrypted and the very key of the first certificate. Any problem is one TlsError line
  naming the flag and the file; nothing half-starts with a broken context.
- An expired (or not yet valid) certificate is logged as a warning, not refused: the node
  has other work than its proxy, and the operator may be renewing it right now.
- Contexts are modern: TLS 1.2 or later, Python's default cipher suites, no renegotiation.
- Clients always verify the certificate and the host name: against `--ca-file` when given
  (only that CA), else against the system trust store. There is no way to skip it.
- This module reads files and builds contexts; it opens no sockets.
"""

from __future__ import annotations

import datetime
import logging
import ssl
from pathlib import Path

log = logging.getLogger("meshd.tls")
MIN_VERSION = ssl.TLSVersion.TLSv1_2


class TlsError(ValueError):
    """A TLS file or setting cannot be used; str() is one line for the operator."""


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def check_pair(cert_file: str, key_file: str) -> None:
    """Refuse (TlsError) a certificate and key that cannot serve: unreadable, not PEM, an
    encrypted key, or a key that is not the certificate's."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_pem, key_pem = _read("--tls-cert", cert_file), _read("--tls-key", key_file)
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsError(f"--tls-cert {cert_file} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsError(f"--tls-key {key_file} is encrypted; give an unencrypted key "
                       "(readable only by the node's user)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsError(f"--tls-key {key_file} holds no PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != certs[0].public_key().public_bytes(der, spki):
        raise TlsError(f"--tls-key {key_file} does not match the certificate in "
                       f"--tls-cert {cert_file}")
    now = datetime.datetime.now(datetime.UTC)
    if not certs[0].not_valid_before_utc <= now <= certs[0].not_valid_after_utc:
        log.warning("the certificate in %s is valid from %s to %s only: clients will refuse "
                    "it", cert_file, certs[0].not_valid_before_utc,
                    certs[0].not_valid_after_utc)


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext | None:
    """The server context for `--tls-cert`/`--tls-key`; None when neither is given."""
    if not cert_file and not key_file:
        return None
    if not cert_file or not key_file:
        given, missing = ("--tls-cert", "--tls-key") if cert_file else ("--tls-key",
                                                                        "--tls-cert")
        raise TlsError(f"{given} needs {missing}: give both the certificate and its key")
    check_pair(cert_file, key_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(str(Path(cert_file).expanduser()), str(Path(key_file).expanduser()))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot use --tls-cert {cert_file} with --tls-key {key_file}: "
                       f"{getattr(exc, 'reason', None) or exc}") from None
    return ctx


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context: the certificate must chain to `ca_file` (only) when given,
    else to the system trust store, and must name the host."""
    try:
        if ca_file:
            ctx = ssl.create_default_context(cafile=str(Path(ca_file).expanduser()))
        else:
            ctx = ssl.create_default_context()
    except ssl.SSLError:  # before OSError, its base class
        raise TlsError(f"--ca-file {ca_file} holds no PEM certificate") from None
    except OSError as exc:
        raise TlsError(f"cannot read --ca-file {ca_file}: {exc.strerror or exc}") from None
    ctx.minimum_version = MIN_VERSION  # verify_mode CERT_REQUIRED and check_hostname: default
    return ctx
