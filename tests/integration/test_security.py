"""Who may connect: only holders of an unrevoked certificate from the org's CA, with the ID dialled.

Each refusal is checked on both sides: the dialer gets ``DialError(refused=True)`` with a reason,
and both nodes log the reason. Refusals are final (one handshake, no retry).
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from hypha.certutil import Identity, create_node, create_org, create_root, write_certificates
from hypha.net import DialError, MTLSTransport, Network, Protocol, open_network
from tests.unit.net._pki import PKI

pytestmark = pytest.mark.timeout(120)

ECHO = Protocol("echo")


async def _echo(peer: object, request: bytes) -> bytes:
    return request


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "hypha.net.tls" and r.levelno >= logging.WARNING]


async def _expect_refused(dialer: Network, target: Network, caplog: pytest.LogCaptureFixture,
                          *, dialer_says: str, target_says: str, addr: object = None,
                          dialer_kind: str = "", target_kind: str = "") -> None:
    caplog.clear()
    before = (dialer.refusals.copy(), target.refusals.copy())
    with trio.fail_after(20):
        with pytest.raises(DialError) as err:
            await dialer.dial(addr or target.addrs[0])
    assert err.value.refused, err.value
    with trio.fail_after(5):  # the listener logs once its side of the handshake has unwound
        while not any(m.startswith("inbound") for m in _refusals(caplog)):
            await trio.sleep(0.01)
    await trio.sleep(0.3)  # room for a retry, which must not come
    logs = _refusals(caplog)
    outbound = [m for m in logs if m.startswith("outbound")]
    inbound = [m for m in logs if m.startswith("inbound")]
    # final: one refused handshake on each side, not four retries
    assert len(outbound) == 1 and len(inbound) == 1, logs
    assert dialer_says in outbound[0], logs
    assert target_says in inbound[0], logs
    assert target.peer_id not in dialer.connected_peers()
    assert dialer.peer_id not in target.connected_peers()
    # and counted, by kind, on each side (hypha_net_refused_total)
    for net, old, kind in ((dialer, before[0], dialer_kind), (target, before[1], target_kind)):
        grown = {k: v - old[k] for k, v in net.refusals.items() if k.startswith("tls-")
                 and v > old[k]}
        assert sum(grown.values()) == 1, grown
        assert not kind or grown.get(kind) == 1, (kind, grown)


async def test_good_certificates_connect_and_talk(pki: PKI) -> None:
    _, fa = pki.node("a")
    _, fb = pki.node("b")
    async with open_network(pki.settings(fa)) as a, open_network(pki.settings(fb)) as b:
        b.serve(ECHO, _echo)
        with trio.fail_after(20):
            assert await a.dial(b.addrs[0]) == b.peer_id
            assert await a.request(b.peer_id, ECHO, b"ping") == b"ping"
        assert a.peer_id == a.transport.peer_id  # the host's identity is the certificate's key
        # our muxer, over our TLS session (py-libp2p would silently use its own without install)
        from hypha.net._tls import TLSSession
        from hypha.net._yamux import Yamux

        conn = a._host.get_network().get_connections(b.peer_id)[0]
        assert isinstance(conn.muxed_conn, Yamux)
        assert isinstance(conn.muxed_conn.secured_conn, TLSSession)
        session = a.transport.sessions()[0]
        assert session.remote_certificate.subject.get_attributes_for_oid(
            NameOID.COMMON_NAME)[0].value == "b"
        # the verified chain reaches the root
        assert session.remote_chain[-1].subject == pki.root.cert.subject


async def test_peer_without_certificate_is_refused(pki: PKI,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    _, fa = pki.node("a")
    _, fb = pki.node("b")
    async with open_network(pki.settings(fa)) as a, open_network(pki.settings(fb)) as b:
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts the CA but presents nothing
        bare.check_hostname = False
        bare.minimum_version = ssl.TLSVersion.TLSv1_3
        bare.load_verify_locations(cafile=pki.trust)
        a.transport._client = bare
        await _expect_refused(a, b, caplog, dialer_says="refused by the peer",
                              target_says="presented no certificate")


async def test_plaintext_and_noise_peers_cannot_negotiate(pki: PKI) -> None:
    """A stock py-libp2p host (Noise, plaintext...) finds no security protocol in common."""
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as x25519_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from multiaddr import Multiaddr

    _, fb = pki.node("b")
    async with open_network(pki.settings(fb)) as b:
        b.serve(ECHO, _echo)
        pair = create_new_key_pair()
        stranger = new_host(key_pair=pair, sec_opt={
            NOISE_ID: NoiseTransport(pair, noise_privkey=x25519_pair().private_key),
            PLAINTEXT_PROTOCOL_ID: InsecureTransport(pair),
        }, listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")])
        async with stranger.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with trio.fail_after(20), pytest.raises(Exception) as err:
                await stranger.connect(info_from_p2p_addr(b.addrs[0]))
            assert "negotiate" in repr(err.getrepr()) or "Failed" in str(err.value)
            assert stranger.get_id() not in b.connected_peers()


async def test_self_signed_certificate_is_refused(pki: PKI, tmp_path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, None))
    mallory = Identity(cert, key)
    own_trust = tmp_path / "mallory-trust.pem"  # mallory trusts itself and the real root
    write_certificates(own_trust, [cert, pki.root.cert])
    fm = pki.files(mallory, "mallory", trust=own_trust, crl=False)
    _, fb = pki.node("b")
    async with open_network(pki.settings(fm)) as m, open_network(pki.settings(fb)) as b:
        await _expect_refused(m, b, caplog, dialer_says="refused by the peer",
                              target_says="self-signed certificate",
                              dialer_kind="tls-refused-by-peer", target_kind="tls-untrusted")


async def test_certificate_from_another_ca_is_refused(pki: PKI, tmp_path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    other = PKI(tmp_path / "other")
    both = tmp_path / "both-roots.pem"
    write_certificates(both, [other.root.cert, pki.root.cert])
    ident = create_node(other.org, "eve")
    fe = other.files(ident, "eve", trust=both, crl=False)
    _, fb = pki.node("b")
    async with open_network(pki.settings(fe)) as e, open_network(pki.settings(fb)) as b:
        await _expect_refused(e, b, caplog, dialer_says="not issued by a trusted CA",
                              target_says="unable to get local issuer certificate",
                              target_kind="tls-untrusted")
        # and the other way round: our node refuses to accept eve as a server
        await _expect_refused(b, e, caplog, dialer_says="unable to get local issuer certificate",
                              target_says="refused by the peer")


async def test_expired_certificate_is_refused(pki: PKI, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    _, fx = pki.expired_node("old")
    with pytest.raises(ValueError, match="valid only from"):  # our own node will not start
        MTLSTransport(fx)
    # a peer that skips that check is still refused by everyone else
    monkeypatch.setattr(MTLSTransport, "_check_own_certificate", lambda self: None)
    _, fb = pki.node("b")
    async with open_network(pki.settings(fx)) as x, open_network(pki.settings(fb)) as b:
        await _expect_refused(x, b, caplog, dialer_says="certificate expired",
                              target_says="certificate has expired", target_kind="tls-expired")


async def test_revoked_certificate_is_refused(pki: PKI,
                                              caplog: pytest.LogCaptureFixture) -> None:
    revoked, fr = pki.node("revoked")
    pki.revoke(revoked)
    _, fb = pki.node("b")
    async with open_network(pki.settings(fr)) as r, open_network(pki.settings(fb)) as b:
        await _expect_refused(r, b, caplog, dialer_says="certificate revoked",
                              target_says="certificate revoked", target_kind="tls-revoked")


async def test_wrong_peer_id_is_refused(pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    """Dialling B's address while expecting C's peer ID: the key does not match the ID."""
    _, fa = pki.node("a")
    _, fb = pki.node("b")
    _, fc = pki.node("c")
    c_id = MTLSTransport(fc).peer_id
    async with open_network(pki.settings(fa)) as a, open_network(pki.settings(fb)) as b:
        addr = str(b.addrs[0]).replace(str(b.peer_id), str(c_id))
        await _expect_refused(a, b, caplog, dialer_says="peer ID mismatch",
                              target_says="peer ID mismatch", addr=addr,
                              dialer_kind="tls-peer-id-mismatch",
                              target_kind="tls-refused-by-peer")


async def test_crl_reload_closes_open_connections_and_refuses_new_ones(
        pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    ia, fa = pki.node("a")
    _, fb = pki.node("b")
    async with open_network(pki.settings(fa)) as a, open_network(pki.settings(fb)) as b:
        b.serve(ECHO, _echo)
        with trio.fail_after(20):
            await a.dial(b.addrs[0])
            assert await a.request(b.peer_id, ECHO, b"before") == b"before"
        pki.revoke(ia)
        with trio.fail_after(10):
            closed = await b.reload_crl()
        assert closed == [a.peer_id]
        with trio.fail_after(10):
            while b.peer_id in a.connected_peers() or a.peer_id in b.connected_peers():
                await trio.sleep(0.02)
        await _expect_refused(a, b, caplog, dialer_says="certificate revoked",
                              target_says="certificate revoked")


async def test_bad_crl_file_keeps_the_old_list(pki: PKI) -> None:
    _, fa = pki.node("a")
    async with open_network(pki.settings(fa)) as a:
        pki.crl.write_text("not a CRL")
        with trio.fail_after(5), pytest.raises(ValueError, match=r"tls\.crl"):
            await a.reload_crl()


def test_node_refuses_to_start_with_mismatched_files(pki: PKI, tmp_path) -> None:
    other = PKI(tmp_path / "other")
    ident = create_node(other.org, "z")
    fz = other.files(ident, "z")
    with pytest.raises(ValueError, match="does not chain to a CA"):
        MTLSTransport(type(fz)(cert=fz.cert, key=fz.key, trust=pki.trust))
    bad_org = create_org(create_root("r2"), "o2")
    del bad_org
