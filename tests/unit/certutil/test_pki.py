"""hypha.certutil's API: the certificates it makes verify with OpenSSL (a real TLS 1.3 handshake
through Python's ssl, both sides authenticated, CRLs checked) and are rejected when they should be;
every bad input raises PKIError with a message that says what is wrong."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

import hypha.certutil
from hypha.certutil import (
    CLOCK_SKEW,
    Identity,
    PKIError,
    create_crl,
    create_node,
    create_org,
    create_root,
    load_certificates,
    load_crls,
    load_identity,
    load_private_key,
    revoked_entry,
    write_certificates,
    write_crl,
    write_private_key,
)
from tests.unit.certutil._tls import context, handshake, pem, save

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def test_public_api() -> None:
    assert sorted(hypha.certutil.__all__) == [
        "CLOCK_SKEW",
        "Identity",
        "PKIError",
        "create_crl",
        "create_node",
        "create_org",
        "create_root",
        "load_certificates",
        "load_crls",
        "load_identity",
        "load_private_key",
        "main",
        "revoked_entry",
        "write_certificates",
        "write_crl",
        "write_private_key",
    ]
    for name in hypha.certutil.__all__:
        assert getattr(hypha.certutil, name) is not None


# --------------------------------------------------------------------------------------------
# Certificate contents


def ext(cert: x509.Certificate | x509.CertificateRevocationList, cls: type[Any]) -> Any:
    return cert.extensions.get_extension_for_class(cls)


def test_root_org_node_contents() -> None:
    root = create_root("hypha", now=NOW)
    org = create_org(root, "acme", now=NOW)
    node = create_node(org, "worker-1", now=NOW)

    assert root.cert.subject == root.cert.issuer
    assert root.cert.subject.rfc4514_string() == "CN=hypha"
    assert ext(root.cert, x509.BasicConstraints).critical
    assert ext(root.cert, x509.BasicConstraints).value == x509.BasicConstraints(True, 1)
    assert ext(org.cert, x509.BasicConstraints).value == x509.BasicConstraints(True, 0)
    assert ext(node.cert, x509.BasicConstraints).value == x509.BasicConstraints(False, None)
    assert ext(node.cert, x509.BasicConstraints).critical
    for ca in (root, org):
        ku = ext(ca.cert, x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        assert not ku.value.digital_signature
    ku = ext(node.cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext(node.cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert ext(node.cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "worker-1"
    ]

    assert org.cert.issuer == root.cert.subject and node.cert.issuer == org.cert.subject
    for name, ident in (("acme", org), ("worker-1", node)):
        assert ident.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert (
            ident.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "acme"
        )
    # SKI on all, AKI = the issuer's SKI
    for child, parent in ((org, root), (node, org)):
        aki = ext(child.cert, x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ext(parent.cert, x509.SubjectKeyIdentifier).value.digest
        child.cert.verify_directly_issued_by(parent.cert)
    for ident in (root, org, node):
        assert ident.cert.signature_algorithm_oid == SignatureAlgorithmOID.ED25519
        assert isinstance(ident.key, Ed25519PrivateKey)
        assert 0 < ident.cert.serial_number < 2**159
        assert ident.cert.version == x509.Version.v3
        assert ident.cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert root.chain == () and org.chain == () and node.chain == (org.cert,)
    assert root.cert.not_valid_after_utc == NOW + dt.timedelta(days=3650)
    assert org.cert.not_valid_after_utc == NOW + dt.timedelta(days=1825)
    assert node.cert.not_valid_after_utc == NOW + dt.timedelta(days=365)
    # no libp2p (or any other private) extension
    assert all(not e.oid.dotted_string.startswith("1.3.6.1.4.1") for e in node.cert.extensions)
    assert node.name == "worker-1"


def test_validity_is_capped_at_the_issuer() -> None:
    root = create_root("hypha", days=100, now=NOW)
    org = create_org(root, "acme", now=NOW)
    node = create_node(org, "worker-1", days=1000, now=NOW)
    assert org.cert.not_valid_after_utc == root.cert.not_valid_after_utc
    assert node.cert.not_valid_after_utc == root.cert.not_valid_after_utc


def test_serials_are_random() -> None:
    org = create_org(create_root("hypha"), "acme")
    serials = {create_node(org, "n").cert.serial_number for _ in range(8)}
    assert len(serials) == 8


# --------------------------------------------------------------------------------------------
# TLS with Python's ssl (OpenSSL): what a peer checking these certificates sees


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Identity]:
    root = create_root("hypha")
    org = create_org(root, "acme")
    return {
        "root": root,
        "org": org,
        "alice": create_node(org, "alice"),
        "bob": create_node(org, "bob"),
    }


def tls(
    tmp_path: Path,
    root: Identity,
    client: Identity,
    server: Identity,
    *,
    crls: tuple[x509.CertificateRevocationList, ...] = (),
    crl_check: bool = False,
    server_hostname: str | None = None,
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    crl_files = []
    for i, crl in enumerate(crls):
        crl_files.append(tmp_path / f"crl{i}.pem")
        write_crl(crl_files[-1], crl)
    kw = {"trust": pem(root.cert), "crl_files": crl_files, "crl_check": crl_check}
    client_ctx = context(ssl.PROTOCOL_TLS_CLIENT, save(client, tmp_path, "client"), **kw)  # type: ignore[arg-type]
    server_ctx = context(ssl.PROTOCOL_TLS_SERVER, save(server, tmp_path, "server"), **kw)  # type: ignore[arg-type]
    hostname = server.name if server_hostname is None else server_hostname
    return handshake(client_ctx, server_ctx, hostname)


def test_tls_handshake_both_sides_authenticated(tmp_path: Path, pki: dict[str, Identity]) -> None:
    client, server = tls(tmp_path, pki["root"], pki["alice"], pki["bob"])
    assert client.version() == "TLSv1.3"
    seen_by_client, seen_by_server = client.getpeercert(), server.getpeercert()
    assert seen_by_client and seen_by_server
    assert seen_by_client["subject"] == ((("commonName", "bob"),), (("organizationName", "acme"),))
    assert seen_by_server["subject"][0] == (("commonName", "alice"),)


def test_tls_with_crl_check(tmp_path: Path, pki: dict[str, Identity]) -> None:
    # the empty CRL `hypha certutil org` writes is enough for CRL-checking peers to accept nodes
    empty = create_crl(pki["org"])
    tls(tmp_path, pki["root"], pki["alice"], pki["bob"], crls=(empty,), crl_check=True)


def self_signed_node(name: str) -> Identity:
    """A leaf with a node's extensions, signed by its own key (no CA behind it)."""
    key = Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, algorithm=None)
    )
    return Identity(cert, key)


def _bad_self_signed(pki: dict[str, Identity]) -> tuple[Identity, dict[str, Any]]:
    return self_signed_node("mallory"), {}


def _bad_other_root(pki: dict[str, Identity]) -> tuple[Identity, dict[str, Any]]:
    other_org = create_org(create_root("hypha"), "acme")  # same names, different keys
    return create_node(other_org, "mallory"), {}


def _bad_expired(pki: dict[str, Identity]) -> tuple[Identity, dict[str, Any]]:
    now = dt.datetime.now(dt.UTC)
    node = create_node(
        pki["org"],
        "mallory",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    return node, {}


def _bad_revoked(pki: dict[str, Identity]) -> tuple[Identity, dict[str, Any]]:
    node = create_node(pki["org"], "mallory")
    crl = create_crl(pki["org"], [(node.cert.serial_number, dt.datetime.now(dt.UTC))])
    return node, {"crls": (crl,), "crl_check": True}


def _bad_no_crl(pki: dict[str, Identity]) -> tuple[Identity, dict[str, Any]]:
    # checking CRLs without the issuer's CRL rejects every certificate, revoked or not
    return create_node(pki["org"], "mallory"), {"crl_check": True}


def _bad_crl_expired(pki: dict[str, Identity]) -> tuple[Identity, dict[str, Any]]:
    stale = create_crl(
        pki["org"], days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    )
    return create_node(pki["org"], "mallory"), {"crls": (stale,), "crl_check": True}


def _bad_crl_of_other_ca(pki: dict[str, Identity]) -> tuple[Identity, dict[str, Any]]:
    # a CRL with the right issuer name but another CA's key does not count: OpenSSL matches the
    # CRL's authorityKeyIdentifier against the issuer's key id and finds no CRL for the leaf
    impostor = create_org(create_root("hypha"), "acme")
    return create_node(pki["org"], "mallory"), {"crls": (create_crl(impostor),), "crl_check": True}


MakeBad = Callable[[dict[str, Identity]], tuple[Identity, dict[str, Any]]]


@pytest.mark.parametrize("bad_side", ["client", "server"])
@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (_bad_self_signed, 18, "self[- ]signed certificate"),
        (_bad_other_root, 20, "unable to get local issuer certificate"),
        (_bad_expired, 10, "certificate has expired"),
        (_bad_revoked, 23, "certificate revoked"),
        (_bad_no_crl, 3, "unable to get certificate CRL"),
        (_bad_crl_expired, 12, "CRL has expired"),
        (_bad_crl_of_other_ca, 3, "unable to get certificate CRL"),
    ],
    ids=["self-signed", "other-root", "expired", "revoked", "no-crl", "crl-expired", "crl-forged"],
)
def test_tls_rejects(
    tmp_path: Path, pki: dict[str, Identity], make: MakeBad, code: int, message: str, bad_side: str
) -> None:
    bad, kw = make(pki)
    good = pki["alice"]
    client, server = (bad, good) if bad_side == "client" else (good, bad)
    with pytest.raises(ssl.SSLCertVerificationError, match=message) as info:
        tls(tmp_path, pki["root"], client, server, **kw)
    assert info.value.verify_code == code, info.value.verify_message


def test_tls_checks_the_node_name(tmp_path: Path, pki: dict[str, Identity]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        tls(tmp_path, pki["root"], pki["alice"], pki["bob"], server_hostname="carol")


def test_stdlib_ssl_reads_crls_from_files_only(tmp_path: Path, pki: dict[str, Identity]) -> None:
    # NOTE: a canary for the network layer. CPython's load_verify_locations(cadata=...) parses
    # certificates only: a CRL-only cadata is an error, and CRLs beside certificates are silently
    # dropped. A CRL must be passed as cafile= (or capath=).
    crl = create_crl(pki["org"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(ssl.SSLError):
        ctx.load_verify_locations(cadata=pem(crl))
    ctx.load_verify_locations(cadata=pem(pki["root"].cert, crl))
    assert ctx.cert_store_stats()["crl"] == 0
    write_crl(tmp_path / "acme.crl.pem", crl)
    ctx.load_verify_locations(cafile=tmp_path / "acme.crl.pem")
    assert ctx.cert_store_stats()["crl"] == 1


# --------------------------------------------------------------------------------------------
# CRLs


def test_create_crl_keeps_entries_and_counts_up() -> None:
    org = create_org(create_root("hypha"), "acme")
    first = create_crl(org, now=NOW)
    assert len(first) == 0
    assert ext(first, x509.CRLNumber).value.crl_number == 1
    assert first.last_update_utc == NOW - CLOCK_SKEW
    assert first.next_update_utc == NOW + dt.timedelta(days=30)
    assert first.issuer == org.cert.subject
    assert first.is_signature_valid(org.cert.public_key())  # type: ignore[arg-type]
    assert (
        ext(first, x509.AuthorityKeyIdentifier).value.key_identifier
        == ext(org.cert, x509.SubjectKeyIdentifier).value.digest
    )

    later = NOW + dt.timedelta(days=3)
    entry = revoked_entry(7, date=NOW, reason=x509.ReasonFlags.key_compromise)
    second = create_crl(org, [entry, (9, NOW)], previous=first, days=10, now=later)
    third = create_crl(org, [(7, later)], previous=second, now=later)  # 7 keeps its first entry
    assert ext(third, x509.CRLNumber).value.crl_number == 3
    assert sorted(e.serial_number for e in third) == [7, 9]
    seven = third.get_revoked_certificate_by_serial_number(7)
    assert seven is not None and seven.revocation_date_utc == NOW
    assert seven.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    assert second.next_update_utc == later + dt.timedelta(days=10)
    # unspecified is written as no reason at all (RFC 5280 §5.3.1)
    assert len(revoked_entry(1, reason=x509.ReasonFlags.unspecified).extensions) == 0


def test_root_revokes_an_org() -> None:
    root = create_root("hypha")
    org = create_org(root, "acme")
    crl = create_crl(root, [(org.cert.serial_number, NOW)])
    assert crl.issuer == root.cert.subject and len(crl) == 1


def test_create_crl_refuses_another_cas_crl() -> None:
    root = create_root("hypha")
    acme, other = create_org(root, "acme"), create_org(root, "other")
    with pytest.raises(PKIError, match="issued by 'O=other,CN=other', not by CA 'acme'"):
        create_crl(acme, previous=create_crl(other))
    with pytest.raises(PKIError, match="not a CA certificate"):
        create_crl(create_node(acme, "n"))
    with pytest.raises(PKIError, match="revoked entry must be"):
        create_crl(acme, [7])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------
# Files


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    org = create_org(create_root("hypha"), "acme")
    node = create_node(org, "worker-1")
    cert, key = save(node, tmp_path, "worker-1")
    loaded = load_identity(cert, key)
    assert loaded == node  # same cert, key (compared by value), chain
    assert load_certificates(cert) == [node.cert, org.cert]
    crl = create_crl(org, [(5, NOW)])
    write_crl(tmp_path / "acme.crl.pem", crl)
    assert load_crls(tmp_path / "acme.crl.pem") == [crl]
    # a combined file (certificates, then the key) loads as a key file too
    (tmp_path / "combined.pem").write_bytes(cert.read_bytes() + key.read_bytes())
    assert load_private_key(tmp_path / "combined.pem").public_key() == node.key.public_key()
    # str paths work as well as Path
    assert load_private_key(str(key)).public_key() == node.key.public_key()


def test_private_keys_are_never_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        calls.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "a.key"
    write_private_key(path, key)
    write_private_key(path, key, force=True)
    # created exclusively with mode 0600 both times: the forced write goes to a temporary file
    # in the same directory, created the same way, then renamed over the old one
    assert len(calls) == 2
    for _, flags, mode in calls:
        assert flags & os.O_CREAT and flags & os.O_EXCL and mode == 0o600
    assert calls[0][0] == str(path) and os.path.dirname(calls[1][0]) == str(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["a.key"]  # no temporary file left behind
    assert load_private_key(path).public_key() == key.public_key()


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    node = create_node(create_org(create_root("hypha"), "acme"), "n")
    key, cert = tmp_path / "n.key", tmp_path / "n.pem"
    write_private_key(key, node.key)
    write_certificates(cert, [node.cert])
    other = create_node(create_org(create_root("hypha"), "acme"), "n")
    with pytest.raises(PKIError, match=r"n\.key exists; pass --force to overwrite"):
        write_private_key(key, other.key)
    with pytest.raises(PKIError, match=r"n\.pem exists; pass --force to overwrite"):
        write_certificates(cert, [other.cert])
    assert load_identity(cert, key).cert == node.cert  # untouched
    write_private_key(key, other.key, force=True)
    write_certificates(cert, [other.cert], force=True)
    assert load_identity(cert, key).cert == other.cert
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # a CRL is updated in place
    org = create_org(create_root("hypha"), "acme")
    write_crl(tmp_path / "c.pem", create_crl(org))
    write_crl(tmp_path / "c.pem", create_crl(org, [(1, NOW)]))
    assert len(load_crls(tmp_path / "c.pem")[0]) == 1


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"nope\.key: no such file"),
        (b"hello\n", r"x\.key: not a PEM file \(no '-----BEGIN PRIVATE KEY-----' block\)"),
        (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            r"x\.key: malformed private key",
        ),
        ("rsa", r"x\.key: not an Ed25519 PKCS#8 private key \(found RSA-1024\)"),
        ("ec", r"x\.key: not an Ed25519 PKCS#8 private key \(found EC secp256r1\)"),
        ("encrypted", r"x\.key: the private key is encrypted"),
        ("cert", r"x\.key: holds CERTIFICATE but no private key — did you swap"),
    ],
    ids=["missing", "garbage", "bad-base64", "rsa", "ec", "encrypted", "certificate"],
)
def test_load_private_key_errors(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "x.key"
    if content is None:
        path = tmp_path / "nope.key"
    elif content == "rsa":
        path.write_bytes(_pkcs8(rsa.generate_private_key(65537, 1024)))
    elif content == "ec":
        path.write_bytes(_pkcs8(ec.generate_private_key(ec.SECP256R1())))
    elif content == "encrypted":
        path.write_bytes(
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            )
        )
    elif content == "cert":
        path.write_text(pem(create_root("hypha").cert))
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    with pytest.raises(PKIError, match=message):
        load_private_key(path)


def test_load_certificates_errors(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match=r"missing\.pem: no such file"):
        load_certificates(tmp_path / "missing.pem")
    (tmp_path / "g.pem").write_text("garbage")
    with pytest.raises(
        PKIError, match=r"g\.pem: not a PEM file \(no '-----BEGIN CERTIFICATE-----'"
    ):
        load_certificates(tmp_path / "g.pem")
    (tmp_path / "b.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(PKIError, match=r"b\.pem: certificate #1 is malformed"):
        load_certificates(tmp_path / "b.pem")
    (tmp_path / "k.pem").write_bytes(_pkcs8(Ed25519PrivateKey.generate()))
    with pytest.raises(
        PKIError, match=r"k\.pem: holds PRIVATE KEY but no certificate — did you swap"
    ):
        load_certificates(tmp_path / "k.pem")
    with pytest.raises(PKIError, match=r"k\.pem: holds PRIVATE KEY but no CRL"):
        load_crls(tmp_path / "k.pem")
    with pytest.raises(PKIError, match="is a directory"):
        load_certificates(tmp_path)


def test_load_identity_errors(tmp_path: Path) -> None:
    org = create_org(create_root("hypha"), "acme")
    a, b = create_node(org, "a"), create_node(org, "b")
    a_cert, _ = save(a, tmp_path, "a")
    _, b_key = save(b, tmp_path, "b")
    with pytest.raises(
        PKIError,
        match=r"b\.key does not hold the private key of certificate .*a\.pem \(O=acme,CN=a, serial",
    ):
        load_identity(a_cert, b_key)
    # the chain must be in order: leaf, then its issuer
    write_certificates(tmp_path / "swapped.pem", [org.cert, a.cert])
    with pytest.raises(
        PKIError, match=r"certificate #1 \(O=acme,CN=acme.*is not signed by certificate #2"
    ):
        load_identity(tmp_path / "swapped.pem", save(org, tmp_path, "org")[1])
    with pytest.raises(PKIError, match="does not match the public key"):
        Identity(a.cert, b.key)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Worker",
        "under_score",
        "-lead",
        "trail-",
        "a..b",
        ".a",
        "a.",
        "has space",
        "ünï",
        "a/b",
        "x" * 65,
    ],
)
def test_bad_node_names(name: str) -> None:
    org = create_org(create_root("hypha"), "acme")
    with pytest.raises(PKIError, match="node name"):
        create_node(org, name)


@pytest.mark.parametrize("name", ["a", "worker-1", "w1.eu-west.acme", "0"])
def test_good_node_names(name: str) -> None:
    create_node(create_org(create_root("hypha"), "acme"), name)


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "has space", "x" * 65])
def test_bad_ca_names(name: str) -> None:
    with pytest.raises(PKIError, match="root name"):
        create_root(name)
    with pytest.raises(PKIError, match="org name"):
        create_org(create_root("hypha"), name)


def test_bad_issuers_and_times() -> None:
    root = create_root("hypha", days=10, now=NOW)
    org = create_org(root, "acme", now=NOW)
    node = create_node(org, "n", now=NOW)
    with pytest.raises(
        PKIError, match="'hypha' is a root CA; node certificates are signed by an org CA"
    ):
        create_node(root, "n", now=NOW)
    with pytest.raises(
        PKIError, match="is not a CA certificate and cannot sign a node certificate"
    ):
        create_node(node, "m", now=NOW)
    with pytest.raises(PKIError, match="'acme' may not sign other CAs"):
        create_org(org, "sub", now=NOW)
    with pytest.raises(PKIError, match="CA 'acme' expired on 2030-01-11T00:00:00Z"):
        create_node(org, "n", now=NOW + dt.timedelta(days=11))
    with pytest.raises(PKIError, match="timezone-aware"):
        create_root("r", now=dt.datetime(2030, 1, 1))
    with pytest.raises(PKIError, match="invalid days: 0"):
        create_root("r", days=0)
    with pytest.raises(PKIError, match="would end"):
        create_node(org, "n", now=NOW, not_before=NOW, not_after=NOW - dt.timedelta(seconds=1))
