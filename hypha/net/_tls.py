"""Mutual TLS 1.3 with CA-signed Ed25519 certificates: Hypha's only libp2p security transport.

Every connection is TLS 1.3 with a certificate required on both sides. OpenSSL checks the peer's
chain up to the trust bundle (the organisation's root CA), its validity period and, when CRLs are
configured, revocation of the leaf (``VERIFY_CRL_CHECK_LEAF``). The libp2p peer ID is derived from
the certificate's Ed25519 public key, so a node cannot claim an ID it holds no certificate for; a
dialer also checks the ID it dialled.

The verdict exchange. In TLS 1.3 the client finishes its handshake before the server has checked
the client's certificate, so a refused dialer would believe it is connected and find out only on
its first read. After the TLS handshake each side therefore sends a one-frame verdict (accepted,
or refused with a reason) inside the encrypted channel and waits for the other's. A refusal by
OpenSSL reaches the other side as the TLS alert, which we flush before closing. Either way both
sides raise :class:`PeerRefused`, a ``HandshakeFailure`` that is logged once with the reason and
is never retried (the host is built with no dial retries; see ``_host.py``).

Why not py-libp2p's TLS transport: it does not verify chains, accepts any certificate, and reads
4 KB at a time. This channel drives ``ssl.SSLObject`` over memory BIOs itself (not
``trio.SSLStream``) so that it can flush the alert of a failed handshake to the peer, read in
256 KiB blocks, and skip the two lock layers of py-libp2p's TCP stream wrapper by talking to the
trio socket directly.
"""

from __future__ import annotations

import _ssl
import itertools
import logging
import ssl
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from libp2p.abc import IRawConnection, ISecureConn, ISecureTransport
from libp2p.connection_types import ConnectionType
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519PrivateKey
from libp2p.crypto.ed25519 import Ed25519PublicKey as Libp2pEd25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IOException
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.security.base_session import BaseSession
from libp2p.security.exceptions import HandshakeFailure
from multiaddr import Multiaddr

from hypha.certutil import PKIError, load_crls, load_identity

__all__ = [
    "PROTOCOL_ID",
    "MTLSTransport",
    "PeerRefused",
    "TLSFiles",
    "TLSSession",
    "peer_id_from_certificate",
]

logger = logging.getLogger("hypha.net.tls")

#: Security protocol ID negotiated by multistream-select. Deliberately not libp2p's ``/tls/1.0.0``:
#: our certificates carry no libp2p extension, so a stock libp2p TLS peer must not negotiate it.
PROTOCOL_ID = TProtocol("/hypha/mtls/1.0.0")

#: Seconds a handshake (TLS + verdicts) may take before the connection is dropped.
HANDSHAKE_TIMEOUT = 10.0
#: Bytes asked of the socket per receive. 256 KiB: 64 KiB reads cost ~15% more CPU per byte.
RECEIVE_SIZE = 256 * 1024
#: Largest plaintext of one TLS record.
RECORD_SIZE = 16 * 1024
#: Plaintext bytes handed to OpenSSL per write call (it cuts them into 16 KiB records).
WRITE_SLICE = 1024 * 1024

_ACCEPT = 0
_REFUSE = 1
_MAX_REASON = 200

# TLS alert reasons (as OpenSSL names them) that a refusing peer sends, in words.
_ALERTS = {
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate revoked",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "unsupported certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "certificate not issued by a trusted CA",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no certificate presented",
    "TLSV1_ALERT_DECRYPT_ERROR": "signature check failed",
    "TLSV1_ALERT_PROTOCOL_VERSION": "TLS version not supported (1.3 required)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake failure",
}


class PeerRefused(HandshakeFailure):
    """A peer was refused (by us or by it) during the security handshake. Final: not retried."""

    def __init__(self, reason: str, *, by_remote: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.by_remote = by_remote


@dataclass(frozen=True)
class TLSFiles:
    """The PEM files a node speaks mTLS with (the ``[tls]`` config section)."""

    cert: Path  #: the node certificate, then the chain that issued it (not the root)
    key: Path  #: the node's Ed25519 private key, PKCS#8
    trust: Path  #: the trusted root CA certificate(s)
    crl: tuple[Path, ...] = ()  #: CRLs; when given, every peer's issuer must have one here


def peer_id_from_certificate(cert: x509.Certificate) -> ID:
    """The libp2p peer ID of a certificate's Ed25519 public key (identity multihash)."""
    public = cert.public_key()
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise ValueError(
            f"certificate {cert.subject.rfc4514_string()} has a {type(public).__name__}; "
            "Hypha node certificates must hold an Ed25519 key"
        )
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return ID.from_pubkey(Libp2pEd25519PublicKey.from_bytes(raw))


class _RawStream(trio.abc.HalfCloseableStream):
    """A py-libp2p raw connection (e.g. a relayed circuit) seen as a trio stream."""

    def __init__(self, conn: IRawConnection) -> None:
        self._conn = conn

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._conn.write(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._conn.read(max_bytes)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self._conn.close()


def _transport_stream(conn: IRawConnection) -> trio.abc.Stream:
    """The fastest trio stream under a raw connection: the socket itself for plain TCP."""
    if isinstance(conn, RawConnection):
        socket_stream = getattr(conn.stream, "stream", None)
        if isinstance(socket_stream, trio.SocketStream):
            return socket_stream
    return _RawStream(conn)


class _Channel:
    """TLS over a trio stream with ``ssl.SSLObject`` and memory BIOs. One reader, many writers."""

    def __init__(self, transport: trio.abc.Stream, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self.transport = transport
        self.obj = obj
        self._in = incoming
        self._out = outgoing
        self._send_lock = trio.StrictFIFOLock()
        self._recv_lock = trio.StrictFIFOLock()
        self.closed = False

    @classmethod
    def wrap(cls, transport: trio.abc.Stream, context: ssl.SSLContext, *,
             server_side: bool) -> _Channel:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(incoming, outgoing, server_side=server_side)
        return cls(transport, obj, incoming, outgoing)

    async def _flush(self) -> None:
        if self._out.pending:
            await self.transport.send_all(self._out.read())

    async def flush_quietly(self) -> None:
        """Send what OpenSSL queued (e.g. the alert of a failed handshake), ignoring errors."""
        try:
            with trio.move_on_after(1):
                async with self._send_lock:
                    await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _fill(self) -> bool:
        data = await self.transport.receive_some(RECEIVE_SIZE)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                async with self._send_lock:
                    await self._flush()
                if not await self._fill():
                    raise EOFError("connection closed during the TLS handshake") from None
        async with self._send_lock:
            await self._flush()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        async with self._send_lock:
            for start in range(0, len(view), WRITE_SLICE):
                chunk = view[start : start + WRITE_SLICE]
                while chunk:
                    written = self.obj.write(chunk)
                    chunk = chunk[written:]
                await self.transport.send_all(self._out.read())
            if not len(view):
                await trio.lowlevel.checkpoint()

    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of plaintext: everything already received, at least one byte."""
        async with self._recv_lock:
            while True:
                try:
                    data = self.obj.read(min(max_bytes, RECORD_SIZE))
                except ssl.SSLWantReadError:
                    if self._out.pending:  # post-handshake messages (e.g. key updates)
                        async with self._send_lock:
                            await self._flush()
                    if not await self._fill():
                        return b""
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b""
                break
            # NOTE: SSL_read returns one TLS record (<= 16 KiB) per call, and SSLObject.read(n)
            # allocates n bytes each time (reading with n = 1 MiB cost ~40% here). So: read a
            # record at a time, and decrypt every record already received before returning,
            # which hands the muxer large blocks and saves a scheduling round trip per record.
            if len(data) >= max_bytes or not (self._in.pending or self.obj.pending()):
                return data
            parts = [data]
            have = len(data)
            while have < max_bytes:
                try:
                    more = self.obj.read(min(max_bytes - have, RECORD_SIZE))
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break
                if not more:
                    break
                parts.append(more)
                have += len(more)
            return b"".join(parts)

    async def read_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            data = await self.read(n - len(buf))
            if not data:
                raise EOFError("connection closed by the remote peer")
            buf += data
        return bytes(buf)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    self.obj.unwrap()
                except (ssl.SSLError, ValueError):
                    pass
                await self.flush_quietly()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.transport.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass


class TLSSession(BaseSession):
    """A connection secured by :class:`MTLSTransport` (py-libp2p's ``ISecureConn``)."""

    def __init__(self, *, channel: _Channel, raw: IRawConnection, local_peer: ID,
                 local_private_key: Libp2pEd25519PrivateKey, remote_peer: ID,
                 remote_certificate: x509.Certificate,
                 remote_chain: Sequence[x509.Certificate], is_initiator: bool) -> None:
        raw_key = remote_certificate.public_key()
        assert isinstance(raw_key, ed25519.Ed25519PublicKey)
        super().__init__(
            local_peer=local_peer,
            local_private_key=local_private_key,
            remote_peer=remote_peer,
            remote_permanent_pubkey=Libp2pEd25519PublicKey.from_bytes(
                raw_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            ),
            is_initiator=is_initiator,
        )
        self._channel = channel
        self._raw = raw
        #: the peer's leaf certificate, and the chain OpenSSL verified (leaf first, root last)
        self.remote_certificate = remote_certificate
        self.remote_chain = tuple(remote_chain)

    async def read(self, n: int | None = None) -> bytes:
        """Up to ``n`` bytes (at least one); ``b""`` once the peer has closed."""
        if n is not None and n <= 0:
            return b""
        try:
            return await self._channel.read(n or RECEIVE_SIZE)
        except (ssl.SSLError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise IOException(f"TLS connection to {self.remote_peer} broke: {exc}") from exc

    async def write(self, data: bytes) -> None:
        try:
            await self._channel.write(data)
        except (ssl.SSLError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise IOException(f"TLS connection to {self.remote_peer} broke: {exc}") from exc

    async def close(self) -> None:
        await self._channel.aclose()

    @property
    def is_closed(self) -> bool:
        return self._channel.closed

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._raw.get_remote_address()

    def get_transport_addresses(self) -> list[Multiaddr]:
        return self._raw.get_transport_addresses()

    def get_connection_type(self) -> ConnectionType:
        return self._raw.get_connection_type()


def _describe_ssl_error(exc: BaseException) -> tuple[str, bool]:
    """(reason in words, whether the remote peer refused us) for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected: {exc.verify_message}", False
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _ALERTS:
            return f"the peer refused our certificate ({_ALERTS[reason]})", True
        if "ALERT" in reason:
            return f"the peer sent TLS alert {reason}", True
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the peer presented no certificate", False
        return f"TLS error: {reason or exc}", False
    return str(exc), False


class MTLSTransport(ISecureTransport):
    """Hypha's security transport for ``new_host(sec_opt={PROTOCOL_ID: MTLSTransport(...)})``.

    Loads the node's certificate and key (whose Ed25519 key becomes the libp2p identity: use
    :attr:`key_pair` for the host), the trust bundle and the CRLs. :meth:`reload_crl` re-reads the
    CRL files: new connections see the new list at once, and the open sessions it revokes are
    returned so that the network can close them.
    """

    def __init__(self, files: TLSFiles, *, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.files = files
        self.handshake_timeout = handshake_timeout
        try:
            identity = load_identity(files.cert, files.key)
        except PKIError as exc:
            raise ValueError(f"tls: {exc}") from exc
        self.certificate = identity.cert
        self.chain = identity.chain
        raw_key = identity.key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        private = Libp2pEd25519PrivateKey.new(raw_key)
        self.key_pair = KeyPair(private, private.get_public_key())
        self.peer_id = peer_id_from_certificate(identity.cert)
        self._crls: list[x509.CertificateRevocationList] = []
        self._sessions: weakref.WeakSet[TLSSession] = weakref.WeakSet()
        #: refused handshakes by kind (``tls-untrusted``, ``tls-expired``, ``tls-revoked``,
        #: ``tls-no-certificate``, ``tls-peer-id-mismatch``, ``tls-refused-by-peer``, ...); the
        #: Network shares its own refusal counter here
        self.refusals: Counter[str] = Counter()
        self._client, self._server = self._build_contexts()
        self._check_own_certificate()

    # -- contexts ---------------------------------------------------------------------------
    def _refused(self, where: str, reason: str, *, by_remote: bool, server_side: bool) -> None:
        self.refusals[_refusal_kind(reason, by_remote)] += 1
        _log_refusal(where, reason, by_remote=by_remote, server_side=server_side)

    def _read_crls(self) -> list[x509.CertificateRevocationList]:
        crls: list[x509.CertificateRevocationList] = []
        for path in self.files.crl:
            try:
                crls.extend(load_crls(path))
            except PKIError as exc:
                raise ValueError(f"tls.crl: {exc}") from exc
        return crls

    def _build_contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        crls = self._read_crls()
        contexts = []
        for protocol in (ssl.PROTOCOL_TLS_CLIENT, ssl.PROTOCOL_TLS_SERVER):
            ctx = ssl.SSLContext(protocol)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.check_hostname = False  # identity is the peer ID, checked after the handshake
            ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                ctx.load_cert_chain(self.files.cert, self.files.key)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"tls.cert/tls.key: cannot load {self.files.cert} with "
                                 f"{self.files.key}: {exc}") from exc
            try:
                ctx.load_verify_locations(cafile=self.files.trust)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"tls.trust: cannot load CA certificates from "
                                 f"{self.files.trust}: {exc}") from exc
            if crls:
                # NOTE: cadata= accepts only certificates; a PEM file may hold CRLs too.
                for path in self.files.crl:
                    ctx.load_verify_locations(cafile=path)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            ctx.verify_flags |= ssl.VERIFY_X509_STRICT
            ctx.options |= ssl.OP_NO_TICKET  # no resumption: every connection is fully verified
            contexts.append(ctx)
        self._crls = crls
        return contexts[0], contexts[1]

    def _check_own_certificate(self) -> None:
        """Refuse to start with a certificate our peers would refuse: clearer than later."""
        links = [self.certificate, *self.chain]
        try:
            for child, parent in itertools.pairwise(links):
                child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise ValueError(f"tls: the chain in {self.files.cert} is broken: {exc}") from exc
        top = links[-1]
        roots = _load_trust(self.files.trust)
        if not any(_issued_by(top, root) for root in roots):
            hint = ("" if self.chain else "; the cert file must hold the node certificate "
                    "followed by its organisation CA certificate")
            raise ValueError(
                f"tls: {self.files.cert} ({self.certificate.subject.rfc4514_string()}) does not "
                f"chain to a CA in {self.files.trust} (top issuer: "
                f"{top.issuer.rfc4514_string()}){hint}"
            )
        now = datetime.now(UTC)
        if not self.certificate.not_valid_before_utc <= now <= self.certificate.not_valid_after_utc:
            raise ValueError(
                f"tls: {self.files.cert} is valid only from "
                f"{self.certificate.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                f"{self.certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; issue a new one with "
                "`hypha certutil node`"
            )

    # -- handshakes -------------------------------------------------------------------------
    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return await self._handshake(conn, server_side=True, expected=None)

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return await self._handshake(conn, server_side=False, expected=peer_id)

    async def _handshake(self, conn: IRawConnection, *, server_side: bool,
                         expected: ID | None) -> TLSSession:
        where = _address(conn)
        context = self._server if server_side else self._client
        channel = _Channel.wrap(_transport_stream(conn), context, server_side=server_side)
        try:
            with trio.fail_after(self.handshake_timeout):
                try:
                    await channel.handshake()
                except ssl.SSLError:
                    await channel.flush_quietly()  # the alert tells the peer why
                    raise
                der = channel.obj.getpeercert(binary_form=True)
                if der is None:  # CERT_REQUIRED makes OpenSSL refuse first; belt and braces
                    raise PeerRefused("the peer presented no certificate", by_remote=False)
                cert = x509.load_der_x509_certificate(der)
                problem = None
                try:
                    remote = peer_id_from_certificate(cert)
                except ValueError as exc:
                    problem = str(exc)
                else:
                    if expected is not None and remote != expected:
                        problem = (f"peer ID mismatch: dialled {expected}, but the certificate "
                                   f"({cert.subject.rfc4514_string()}) is {remote}")
                await channel.write(_verdict(problem))
                if problem is not None:
                    raise PeerRefused(problem, by_remote=False)
                status, reason = await _read_verdict(channel)
                if status != _ACCEPT:
                    raise PeerRefused(f"the peer refused us: {reason}", by_remote=True)
        except PeerRefused as exc:
            await channel.aclose()
            self._refused(where, exc.reason, by_remote=exc.by_remote, server_side=server_side)
            raise
        except ssl.SSLError as exc:
            await channel.aclose()
            reason, by_remote = _describe_ssl_error(exc)
            self._refused(where, reason, by_remote=by_remote, server_side=server_side)
            raise PeerRefused(reason, by_remote=by_remote) from exc
        except trio.TooSlowError as exc:
            await channel.aclose()
            reason = f"handshake timed out after {self.handshake_timeout:g} s"
            self._refused(where, reason, by_remote=False, server_side=server_side)
            raise HandshakeFailure(reason) from exc
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await channel.aclose()
            reason = f"connection lost during the handshake ({exc or type(exc).__name__})"
            self._refused(where, reason, by_remote=True, server_side=server_side)
            raise HandshakeFailure(reason) from exc
        except BaseException:
            await channel.aclose()
            raise
        chain = _verified_chain(channel.obj) or [cert]
        session = TLSSession(
            channel=channel, raw=conn, local_peer=self.peer_id,
            local_private_key=self.key_pair.private_key,  # type: ignore[arg-type]
            remote_peer=remote, remote_certificate=cert, remote_chain=chain,
            is_initiator=not server_side,
        )
        self._sessions.add(session)
        logger.debug("secured %s connection with %s (%s) at %s",
                     "inbound" if server_side else "outbound", remote,
                     cert.subject.rfc4514_string(), where)
        return session

    # -- revocation -------------------------------------------------------------------------
    def reload_crl(self) -> list[TLSSession]:
        """Re-read the CRL files; return the open sessions whose certificate is now revoked.

        New handshakes use the new CRLs at once. A CRL file that fails to load leaves the old
        list in force and raises ``ValueError``.
        """
        self._client, self._server = self._build_contexts()
        revoked = [s for s in list(self._sessions)
                   if not s.is_closed and self.is_revoked(s.remote_certificate, s.remote_chain)]
        logger.info("reloaded %d CRL(s); %d open connection(s) now revoked",
                    len(self._crls), len(revoked))
        return revoked

    def is_revoked(self, cert: x509.Certificate, chain: Sequence[x509.Certificate] = ()) -> bool:
        """Whether a CRL in force, signed by the certificate's issuer, lists it."""
        issuers = [c for c in chain if c.subject == cert.issuer]
        for crl in self._crls:
            if crl.issuer != cert.issuer:
                continue
            if issuers and not any(_crl_signed_by(crl, i) for i in issuers):
                continue
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                return True
        return False

    def sessions(self) -> list[TLSSession]:
        return [s for s in list(self._sessions) if not s.is_closed]


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    public = issuer.public_key()
    return isinstance(public, ed25519.Ed25519PublicKey) and crl.is_signature_valid(public)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_trust(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"tls.trust: cannot read certificates from {path}: {exc}") from exc


def _verified_chain(obj: ssl.SSLObject) -> list[x509.Certificate]:
    # NOTE: SSLObject.get_verified_chain is public from Python 3.13; 3.10-3.12 have it on the
    # private _sslobj. Only CRL reloads use the chain (to check a CRL's signature).
    getter = getattr(obj, "get_verified_chain", None) or getattr(
        getattr(obj, "_sslobj", None), "get_verified_chain", None)
    if getter is None:
        return []
    try:
        chain = getter()
    except (ssl.SSLError, ValueError, AttributeError):
        return []
    out = []
    for item in chain:
        der = item if isinstance(item, bytes) else item.public_bytes(_ssl.ENCODING_DER)
        out.append(x509.load_der_x509_certificate(der))
    return out


def _verdict(problem: str | None) -> bytes:
    if problem is None:
        return bytes([_ACCEPT, 0])
    reason = problem.encode()[:_MAX_REASON]
    return bytes([_REFUSE, len(reason)]) + reason


async def _read_verdict(channel: _Channel) -> tuple[int, str]:
    head = await channel.read_exactly(2)
    status, length = head[0], head[1]
    if status not in (_ACCEPT, _REFUSE) or length > _MAX_REASON:
        raise PeerRefused(f"malformed handshake verdict {head.hex()}", by_remote=False)
    reason = (await channel.read_exactly(length)).decode(errors="replace") if length else ""
    return status, reason


def _address(conn: IRawConnection) -> str:
    try:
        addr = conn.get_remote_address()
    except Exception:  # only used in log lines
        addr = None
    return f"{addr[0]}:{addr[1]}" if addr else "unknown address"


def _refusal_kind(reason: str, by_remote: bool) -> str:
    """The counter a refused handshake goes to (``tls-<kind>``), from its reason."""
    text = reason.lower()
    if by_remote:
        return "tls-refused-by-peer"
    for words, kind in ((("no certificate", "peer did not return a certificate"), "no-certificate"),
                        (("expired", "not yet valid"), "expired"),
                        (("revoked",), "revoked"),
                        (("peer id",), "peer-id-mismatch"),
                        (("timed out",), "timeout"),
                        (("verify failed", "self-signed", "self signed", "issuer", "unknown ca",
                          "chain"), "untrusted")):
        if any(w in text for w in words):
            return f"tls-{kind}"
    return "tls-other"


def _log_refusal(where: str, reason: str, *, by_remote: bool, server_side: bool) -> None:
    direction = "inbound" if server_side else "outbound"
    if by_remote:
        logger.warning("%s connection %s refused by the peer: %s", direction, where, reason)
    else:
        logger.warning("%s connection %s refused: %s", direction, where, reason)
