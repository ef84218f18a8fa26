"""The certificate authority behind ``hypha certutil``: root → org → node certificates, CRLs, and
the PEM files that hold them.

Every certificate is plain X.509 v3 signed with Ed25519, so that any TLS stack (OpenSSL through
Python's ``ssl``, rustls, Go) verifies it without knowing about Hypha:

- root: ``CN=name``; a CA that may sign one level of CAs below it (``pathlen:1``).
- org:  ``CN=name, O=name``; a CA signed by the root that signs only leaves (``pathlen:0``).
- node: ``CN=name, O=<org's O>``, ``SAN=DNS:name``; a TLS client *and* server leaf signed by an
  org, so two nodes authenticate each other with the same certificate.

A CRL is issued by the CA that issued the certificates it revokes (the org for nodes, the root for
orgs): OpenSSL looks a leaf's CRL up by the leaf's issuer name and checks it with that issuer's
key.

Every bad input raises :class:`PKIError` with a message that names the file, says what is wrong,
and how to fix it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CLOCK_SKEW",
    "Identity",
    "PKIError",
    "RevokedEntry",
    "create_crl",
    "create_node",
    "create_org",
    "create_root",
    "load_certificates",
    "load_crls",
    "load_identity",
    "load_private_key",
    "revoked_entry",
    "write_certificates",
    "write_crl",
    "write_private_key",
]

PathLike = str | os.PathLike[str]

#: A revoked certificate as accepted by :func:`create_crl`: a ready entry, or (serial, date).
RevokedEntry = x509.RevokedCertificate | tuple[int, dt.datetime]

#: How far back notBefore (and a CRL's lastUpdate) is dated from ``now``. NOTE: peers' clocks
#: disagree; a certificate made "now" would be rejected as not yet valid by a peer whose clock is
#: a few seconds behind. Five minutes is what most CAs use (Let's Encrypt backdates by one hour).
CLOCK_SKEW = dt.timedelta(minutes=5)

# A node name is a DNS host name (it goes into subjectAltName as a dNSName): dot-separated labels
# of lowercase letters, digits and inner hyphens. 64 characters at most, the X.509 upper bound of
# a commonName. CA names only become CN/O and file names, so they may also hold '_' and '.'.
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NODE_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_CA_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_MAX_NAME = 64

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


T = TypeVar("T")


class PKIError(Exception):
    """Any input the certificate tool cannot use: a missing or malformed file, a key of the wrong
    type, a key that does not belong to its certificate, a certificate from the wrong CA, an output
    that already exists. The message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Identity:
    """A certificate, its private key, and the certificates of its issuers below the root (leaf's
    issuer first). For a node: ``chain == (org_cert,)``; for an org or a root: ``chain == ()``.

    ``(cert, *chain)`` is what a node presents in a TLS handshake; the root is never sent, each
    peer has it as its trust anchor.

    Two identities are equal when their certificates and chains are: the key must match the
    certificate, and key objects do not compare by value.
    """

    cert: x509.Certificate
    key: Ed25519PrivateKey = field(compare=False, repr=False)
    chain: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.key, Ed25519PrivateKey):
            raise PKIError(
                f"Identity.key must be an Ed25519 private key, got {_key_kind(self.key)}"
            )
        if not _key_matches(self.key, self.cert):
            raise PKIError(
                f"Identity.key does not match the public key of certificate {_describe(self.cert)}"
            )

    @property
    def name(self) -> str:
        """The certificate's common name."""
        return _common_name(self.cert)


# --------------------------------------------------------------------------------------------
# Creating certificates


def create_root(name: str, *, days: int = 3650, now: dt.datetime | None = None) -> Identity:
    """A self-signed root CA ``CN=name`` valid for ``days`` days, that may sign org CAs."""
    _check_ca_name(name, "root")
    now = _now(now)
    key = Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, subject, key.public_key(), now - CLOCK_SKEW, now + _days(days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, algorithm=None)
    )
    return Identity(cert, key)


def create_org(
    root: Identity, name: str, *, days: int = 1825, now: dt.datetime | None = None
) -> Identity:
    """An organisation CA ``CN=name, O=name`` signed by ``root``, that may sign node certificates
    only. Its validity is capped at the root's notAfter."""
    _check_ca_name(name, "org")
    now = _now(now)
    _check_issuer(root, now, signs="an org certificate")
    bc = _basic_constraints(root.cert)
    if bc is not None and bc.path_length is not None and bc.path_length < 1:
        raise PKIError(
            f"CA {root.name!r} may not sign other CAs (pathlen {bc.path_length}); "
            "org CAs are signed by a root CA made with `hypha certutil root`"
        )
    key = Ed25519PrivateKey.generate()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
        ]
    )
    not_after = min(now + _days(days), root.cert.not_valid_after_utc)
    cert = (
        _builder(subject, root.cert.subject, key.public_key(), now - CLOCK_SKEW, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(root.cert), critical=False)
        .sign(root.key, algorithm=None)
    )
    return Identity(cert, key)


def create_node(
    org: Identity,
    name: str,
    *,
    days: int = 365,
    now: dt.datetime | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Identity:
    """A node certificate ``CN=name, O=<org's O>, SAN=DNS:name`` signed by the org CA, usable as a
    TLS server and client certificate.

    Valid from ``now - CLOCK_SKEW`` for ``days`` days, capped at the org's notAfter; pass
    ``not_before`` / ``not_after`` to set the window exactly (tests make expired certificates
    this way). ``name`` must be a DNS host name: lowercase letters, digits, '-' and '.'.
    """
    _check_node_name(name)
    now = _now(now)
    _check_issuer(org, now, signs="a node certificate")
    if org.cert.issuer == org.cert.subject:
        raise PKIError(
            f"{org.name!r} is a root CA; node certificates are signed by an org CA "
            "(create one with `hypha certutil org --ca ROOT --name ORG`)"
        )
    start = _aware(not_before, "not_before") if not_before is not None else now - CLOCK_SKEW
    if not_after is not None:
        end = _aware(not_after, "not_after")
    else:
        end = min(now + _days(days), org.cert.not_valid_after_utc)
    if end <= start:
        raise PKIError(f"node certificate would end ({end}) before it starts ({start})")
    orgs = org.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    org_name = str(orgs[0].value) if orgs else org.name
    key = Ed25519PrivateKey.generate()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org_name),
        ]
    )
    cert = (
        _builder(subject, org.cert.subject, key.public_key(), start, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_NODE_KEY_USAGE, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(org.cert), critical=False)
        .sign(org.key, algorithm=None)
    )
    return Identity(cert, key, (org.cert, *org.chain))


def revoked_entry(
    serial: int,
    *,
    date: dt.datetime | None = None,
    reason: x509.ReasonFlags | None = None,
) -> x509.RevokedCertificate:
    """A CRL entry for certificate ``serial`` revoked at ``date`` (default now), with an optional
    reason code (RFC 5280 §5.3.1: omit it rather than say ``unspecified``)."""
    builder = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_now(date))
    if reason is not None and reason is not x509.ReasonFlags.unspecified:
        builder = builder.add_extension(x509.CRLReason(reason), critical=False)
    return builder.build()


def create_crl(
    issuer: Identity,
    revoked: Iterable[RevokedEntry] = (),
    *,
    previous: x509.CertificateRevocationList | None = None,
    days: int = 30,
    now: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``issuer`` listing the entries of ``previous`` (which must be this CA's)
    plus ``revoked``, numbered one past ``previous`` (or 1), valid from now for ``days`` days.

    A serial already listed keeps its first entry. Peers that check CRLs reject every certificate
    of this CA once the CRL's nextUpdate has passed, so re-issue it (``hypha certutil crl``) well
    before then.
    """
    now = _now(now)
    _check_issuer(issuer, now, signs="a CRL")
    entries: dict[int, x509.RevokedCertificate] = {}
    number = 1
    if previous is not None:
        if previous.issuer != issuer.cert.subject or not previous.is_signature_valid(
            issuer.cert.public_key()  # type: ignore[arg-type]
        ):
            raise PKIError(
                f"the existing CRL was issued by {previous.issuer.rfc4514_string()!r}, not by CA "
                f"{issuer.name!r}; pass that CA's CRL, or the CA that issued this CRL"
            )
        for entry in previous:
            entries.setdefault(entry.serial_number, entry)
        try:
            number = (
                previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
            )
        except x509.ExtensionNotFound:
            number = 1
    for item in revoked:
        if isinstance(item, x509.RevokedCertificate):
            entry = item
        elif isinstance(item, tuple) and len(item) == 2:
            entry = revoked_entry(int(item[0]), date=item[1])
        else:
            raise PKIError(
                f"a revoked entry must be an x509.RevokedCertificate or (serial, date), got {item!r}"
            )
        entries.setdefault(entry.serial_number, entry)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + _days(days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_authority_key_id(issuer.cert), critical=False)
    )
    for entry in entries.values():
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(issuer.key, algorithm=None)


# --------------------------------------------------------------------------------------------
# Writing files


def write_private_key(path: PathLike, key: Ed25519PrivateKey, *, force: bool = False) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, readable by its owner only (mode 0600 from the
    moment the file exists). Refuses an existing file unless ``force``; then replaces it
    atomically."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(path, data, mode=0o600, force=force)


def write_certificates(
    path: PathLike, certs: Sequence[x509.Certificate], *, force: bool = False
) -> None:
    """Write ``certs`` (leaf first, then its issuers) as concatenated PEM. Refuses an existing file
    unless ``force``; then replaces it atomically."""
    if not certs:
        raise PKIError(f"{os.fspath(path)}: no certificates to write")
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    _write(path, data, mode=0o644, force=force)


def write_crl(path: PathLike, crl: x509.CertificateRevocationList) -> None:
    """Write ``crl`` as PEM, atomically replacing an existing file (a CRL is updated in place)."""
    _write(path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644, force=True)


def _write(path: PathLike, data: bytes, *, mode: int, force: bool) -> None:
    name = os.fspath(path)
    parent = os.path.dirname(name) or "."
    if not os.path.isdir(parent):
        raise PKIError(f"{name}: directory {parent} does not exist; create it first")
    if not force:
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise PKIError(f"{name} exists; pass --force to overwrite") from None
        except OSError as exc:
            raise PKIError(f"{name}: cannot create ({exc.strerror})") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(name)
            raise
        return
    if os.path.isdir(name):
        raise PKIError(f"{name} is a directory; pass a file path")
    # The temporary file is created like the final one (O_EXCL, the final mode, the umask
    # applied), so a private key is never readable by others, not even for an instant.
    tmp = os.path.join(parent, f".{os.path.basename(name)}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise PKIError(f"{name}: cannot create a file in {parent} ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Reading files


def load_private_key(path: PathLike) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path`` (unencrypted PKCS#8, as certutil writes)."""
    name = os.fspath(path)
    data = _read(name)
    found = [(m.group(1).decode(), m.group(0)) for m in _PEM_BLOCK.finditer(data)]
    if not found:
        raise PKIError(
            f"{name}: not a PEM file (no '-----BEGIN PRIVATE KEY-----' block); "
            "expected an Ed25519 PKCS#8 private key as written by `hypha certutil`"
        )
    keys = [(label, block) for label, block in found if label.endswith("PRIVATE KEY")]
    if not keys:
        labels = ", ".join(sorted({label for label, _ in found}))
        raise PKIError(
            f"{name}: holds {labels} but no private key — did you swap the .pem and .key paths?"
        )
    label, block = keys[0]  # the first key; a combined cert + key file loads too
    if label == "ENCRYPTED PRIVATE KEY":
        raise PKIError(
            f"{name}: the private key is encrypted; certutil uses unencrypted keys "
            f"(decrypt it with `openssl pkey -in {name} -out PLAIN.key`)"
        )
    try:
        key = serialization.load_pem_private_key(block, password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{name}: malformed private key ({exc})") from None
    except Exception as exc:  # cryptography reports some unsupported key types differently
        raise PKIError(f"{name}: unreadable private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PKIError(
            f"{name}: not an Ed25519 PKCS#8 private key (found {_key_kind(key)}); "
            "Hypha uses Ed25519 keys only — make a new one with `hypha certutil`"
        )
    return key


def load_certificates(path: PathLike) -> list[x509.Certificate]:
    """The certificates in PEM file ``path``, in file order (for a node: leaf, then its org)."""
    return _load_pem(path, "CERTIFICATE", "certificate", x509.load_pem_x509_certificate)


def load_crls(path: PathLike) -> list[x509.CertificateRevocationList]:
    """The CRLs in PEM file ``path``, in file order."""
    return _load_pem(path, "X509 CRL", "CRL", x509.load_pem_x509_crl)


def _load_pem(path: PathLike, label: str, what: str, load: Callable[[bytes], T]) -> list[T]:
    name = os.fspath(path)
    items = []
    for i, block in enumerate(_pem_blocks(name, label, what), 1):
        try:
            items.append(load(block))
        except ValueError as exc:
            raise PKIError(f"{name}: {what} #{i} is malformed ({exc})") from None
    return items


def load_identity(cert_path: PathLike, key_path: PathLike) -> Identity:
    """The identity in ``cert_path`` (leaf first, then the issuers below the root, each signed by
    the next) and ``key_path`` (the leaf's private key)."""
    cert_name, key_name = os.fspath(cert_path), os.fspath(key_path)
    certs = load_certificates(cert_name)
    key = load_private_key(key_name)
    leaf, chain = certs[0], tuple(certs[1:])
    if not _key_matches(key, leaf):
        raise PKIError(
            f"{key_name} does not hold the private key of certificate {cert_name} "
            f"({_describe(leaf)}); pass the .key file written together with that certificate"
        )
    for i, (child, parent) in enumerate(itertools.pairwise(certs), 1):
        if not _issued_by(child, parent):
            raise PKIError(
                f"{cert_name}: certificate #{i} ({_describe(child)}) is not signed by certificate "
                f"#{i + 1} ({_describe(parent)}); the file must hold the leaf first, then its "
                "issuer, and so on"
            )
    return Identity(leaf, key, chain)


def _read(name: str) -> bytes:
    try:
        with open(name, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise PKIError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise PKIError(f"{name} is a directory; pass a file path") from None
    except OSError as exc:
        raise PKIError(f"{name}: cannot read ({exc.strerror})") from None


def _pem_blocks(name: str, label: str, what: str) -> list[bytes]:
    data = _read(name)
    found = list(_PEM_BLOCK.finditer(data))
    blocks = [m.group(0) for m in found if m.group(1).decode() == label]
    if blocks:
        return blocks
    if found:
        labels = ", ".join(sorted({m.group(1).decode() for m in found}))
        hint = " — did you swap the .pem and .key paths?" if "PRIVATE KEY" in labels else ""
        raise PKIError(f"{name}: holds {labels} but no {what}{hint}")
    raise PKIError(f"{name}: not a PEM file (no '-----BEGIN {label}-----' block)")


# --------------------------------------------------------------------------------------------
# Helpers

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_NODE_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: Ed25519PublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _check_issuer(ca: Identity, now: dt.datetime, *, signs: str) -> None:
    bc = _basic_constraints(ca.cert)
    if bc is None or not bc.ca:
        raise PKIError(
            f"{_describe(ca.cert)} is not a CA certificate and cannot sign {signs}; "
            "pass the org CA (or the root, for an org)"
        )
    try:
        ku = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    wanted = "crl_sign" if signs == "a CRL" else "key_cert_sign"
    if ku is not None and not getattr(ku, wanted):
        raise PKIError(f"CA {ca.name!r} lacks keyUsage {wanted} and cannot sign {signs}")
    if ca.cert.not_valid_after_utc <= now:
        raise PKIError(
            f"CA {ca.name!r} expired on {_iso(ca.cert.not_valid_after_utc)}; "
            "create a new CA and re-issue the certificates below it"
        )


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _key_matches(key: object, cert: x509.Certificate) -> bool:
    if not isinstance(key, Ed25519PrivateKey):
        return False
    public = cert.public_key()
    return isinstance(public, Ed25519PublicKey) and public == key.public_key()


def _key_kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    kinds = {
        Ed25519PrivateKey: "Ed25519",
        ed448.Ed448PrivateKey: "Ed448",
        dsa.DSAPrivateKey: "DSA",
        x25519.X25519PrivateKey: "X25519",
        x448.X448PrivateKey: "X448",
    }
    for cls, kind in kinds.items():
        if isinstance(key, cls):
            return kind
    return type(key).__name__


def _check_node_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise PKIError("node name must be a non-empty string")
    if len(name) > _MAX_NAME or not _NODE_NAME.fullmatch(name):
        raise PKIError(
            f"invalid node name {name!r}: a node name is a DNS host name of at most {_MAX_NAME} "
            "characters — lowercase letters, digits and '-', in labels separated by '.', "
            "each starting and ending with a letter or digit (e.g. 'worker-1')"
        )


def _check_ca_name(name: str, kind: str) -> None:
    if not isinstance(name, str) or not name:
        raise PKIError(f"{kind} name must be a non-empty string")
    if len(name) > _MAX_NAME or not _CA_NAME.fullmatch(name):
        raise PKIError(
            f"invalid {kind} name {name!r}: use at most {_MAX_NAME} letters, digits, '.', '_' "
            "and '-', starting and ending with a letter or digit (it also names the files)"
        )


def _common_name(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def _describe(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()}, serial {cert.serial_number:x}"


def _days(days: int) -> dt.timedelta:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PKIError(f"invalid days: {days!r} (a whole number of days, at least 1)")
    return dt.timedelta(days=days)


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC).replace(microsecond=0)
    return _aware(now, "now")


def _aware(when: dt.datetime, what: str) -> dt.datetime:
    if not isinstance(when, dt.datetime) or when.tzinfo is None:
        raise PKIError(f"{what} must be a timezone-aware datetime, got {when!r}")
    return when.astimezone(dt.UTC)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
