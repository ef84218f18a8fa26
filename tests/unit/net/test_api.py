"""hypha.net's public surface and the checks made before any socket opens."""

from __future__ import annotations

from pathlib import Path

import pytest

import hypha.net
from hypha.certutil import write_certificates
from hypha.net import MTLSTransport, NetworkSettings, Protocol, TLSFiles, peer_id_from_certificate
from tests.unit.net._pki import PKI


def test_exports() -> None:
    assert sorted(hypha.net.__all__) == sorted(
        name for name in dir(hypha.net) if not name.startswith("_") and name not in (
            "annotations",))
    for name in hypha.net.__all__:
        assert getattr(hypha.net, name) is not None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"listen": ("not-an-addr",)}, "network.listen: 'not-an-addr' is not a multiaddr"),
    ({"bootstrap": ("/ip4/127.0.0.1/tcp/1",)}, r"lacks /p2p/<peer id>"),
    ({"dht_mode": "peer"}, "dht_mode must be"),
    ({"gossip_heartbeat": 0.0}, "gossip_heartbeat must be a positive"),
    ({"gossip_heartbeat": float("nan")}, "gossip_heartbeat must be a positive"),
    ({"muxer": "mplex"}, "muxer must be"),
])
def test_bad_settings_are_refused(tmp_path: Path, kwargs: dict[str, object],
                                  message: str) -> None:
    files = TLSFiles(cert=tmp_path / "c", key=tmp_path / "k", trust=tmp_path / "t")
    with pytest.raises(ValueError, match=message):
        NetworkSettings(tls=files, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "Bad Name"}, "invalid protocol name"),
    ({"name": "x", "version": "v1"}, "invalid protocol version"),
    ({"name": "x", "max_request": 0}, "invalid max_request"),
    ({"name": "x", "max_response": 1 << 40}, "invalid max_response"),
])
def test_bad_protocols_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Protocol(**kwargs)  # type: ignore[arg-type]


def test_protocol_ids_are_versioned() -> None:
    assert Protocol("lease", "2.1").id == "/hypha/lease/2.1"


def test_transport_identity_is_the_certificate_key(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    ident, files = pki.node("n1")
    transport = MTLSTransport(files)
    assert transport.peer_id == peer_id_from_certificate(ident.cert)
    assert transport.key_pair.public_key.to_bytes() == ident.key.public_key().public_bytes_raw()


def test_transport_refuses_unusable_files_with_the_path(tmp_path: Path) -> None:
    pki = PKI(tmp_path)
    ident, files = pki.node("n1")
    with pytest.raises(ValueError, match=r"missing\.pem"):
        MTLSTransport(TLSFiles(cert=tmp_path / "missing.pem", key=files.key, trust=files.trust))
    # a key that belongs to another certificate
    _, other = pki.node("n2")
    with pytest.raises(ValueError, match="does not hold the private key"):
        MTLSTransport(TLSFiles(cert=files.cert, key=other.key, trust=files.trust))
    # the node certificate without its org CA: it cannot chain to the root
    leaf_only = tmp_path / "leaf.pem"
    write_certificates(leaf_only, [ident.cert])
    with pytest.raises(ValueError, match="followed by its organisation CA"):
        MTLSTransport(TLSFiles(cert=leaf_only, key=files.key, trust=files.trust))
    # a CRL file that is not a CRL
    bad_crl = tmp_path / "bad.crl.pem"
    bad_crl.write_text("garbage")
    with pytest.raises(ValueError, match=r"tls\.crl"):
        MTLSTransport(TLSFiles(cert=files.cert, key=files.key, trust=files.trust, crl=(bad_crl,)))
    # a trust bundle that is not PEM
    with pytest.raises(ValueError, match="trust"):
        MTLSTransport(TLSFiles(cert=files.cert, key=files.key, trust=bad_crl))
