"""A real TLS 1.3 handshake between two in-memory endpoints (ssl.MemoryBIO pairs), both sides
presenting a certificate chain and requiring the other's, as two Hypha nodes do."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hypha.certutil import Identity, write_certificates, write_private_key


def pem(*items: x509.Certificate | x509.CertificateRevocationList) -> str:
    return b"".join(i.public_bytes(serialization.Encoding.PEM) for i in items).decode()


def save(ident: Identity, directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``ident`` as certutil does: name.pem (leaf, then chain) and name.key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    write_certificates(cert, [ident.cert, *ident.chain], force=True)
    write_private_key(key, ident.key, force=True)
    return cert, key


def context(
    side: int,
    chain: tuple[Path, Path],
    trust: str,
    *,
    crl_files: Sequence[Path] = (),
    crl_check: bool = False,
) -> ssl.SSLContext:
    """A context for ``side`` (ssl.PROTOCOL_TLS_SERVER / _CLIENT) presenting ``chain`` (cert
    file, key file), trusting the PEM roots ``trust``, strict X.509 checks, TLS 1.3 only."""
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(*chain)
    ctx.load_verify_locations(cadata=trust)
    # NOTE: CRLs must come from a file: load_verify_locations(cadata=...) reads certificates only
    # and silently skips CRL blocks (see test_stdlib_ssl_reads_crls_from_files_only).
    for crl in crl_files:
        ctx.load_verify_locations(cafile=crl)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if crl_check:
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_hostname: str | None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run the handshake to completion on both sides; raises the first side's ssl error."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, obj in (("client", client), ("server", server)):
            if done[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client's certificate after the client finished;
            # exchange one byte each way so that a rejection reaches the client too.
            client.write(b"c")
            server.write(b"s")
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            assert server.read(1) == b"c" and client.read(1) == b"s"
            return client, server
    raise AssertionError("the handshake did not finish in 20 round trips")
