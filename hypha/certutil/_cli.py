"""``hypha certutil``: the command line over :mod:`hypha.certutil._pki`.

Files it writes (``--ca PREFIX`` names a CA by the path of its files without the extension)::

    root --name R            → R.pem (root cert), R.key
    org  --name O --ca R     → O.pem (org cert), O.key, O.crl.pem (empty CRL of O)
    node -n N --ca O         → N.pem (node cert, then O's cert), N.key
    revoke --ca O --cert F   → O.crl.pem with F's leaf added (created when missing)
    crl --ca O               → O.crl.pem re-signed with a fresh nextUpdate

Every bad input ends with ``hypha certutil: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cryptography import x509

from hypha.certutil._pki import (
    Identity,
    PKIError,
    _iso,
    _issued_by,
    create_crl,
    create_node,
    create_org,
    create_root,
    load_certificates,
    load_crls,
    load_identity,
    revoked_entry,
    write_certificates,
    write_crl,
    write_private_key,
)
from hypha.rolecli import RaisingParser, UsageError

__all__ = ["PROG", "main"]

PROG = "hypha certutil"

# RFC 5280 §5.3.1 reasons that make sense for a permanent revocation ("unspecified" is the same as
# giving none; certificateHold and removeFromCRL need un-revoking, which this tool does not do).
_REASONS = {
    r.name.replace("_", "-"): r
    for r in x509.ReasonFlags
    if r
    not in (
        x509.ReasonFlags.unspecified,
        x509.ReasonFlags.certificate_hold,
        x509.ReasonFlags.remove_from_crl,
    )
}




def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hypha certutil`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version print, then "exit"; return instead
            return exc.code if isinstance(exc.code, int) else 0
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        args.run(args)
    except UsageError as exc:
        exc.parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except PKIError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = RaisingParser(
        prog=PROG,
        description="Create the certificates of a Hypha network: a root CA, organisation CAs "
        "signed by it, node certificates signed by an organisation, and the organisations' CRLs. "
        "Keys are Ed25519 (PKCS#8 PEM, mode 0600); certificates are plain X.509 PEM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=RaisingParser)

    p = sub.add_parser(
        "root", help="create a root CA", description="Create a root CA: NAME.pem, NAME.key."
    )
    p.add_argument("--name", required=True, help="the root's common name (also names the files)")
    _add_output(p, default_days=3650)
    p.set_defaults(run=_cmd_root)

    p = sub.add_parser(
        "org",
        help="create an organisation CA signed by the root",
        description="Create an organisation CA signed by the root: NAME.pem, NAME.key and an "
        "empty CRL NAME.crl.pem.",
    )
    p.add_argument("--name", required=True, help="the organisation's name (CN and O)")
    _add_ca(p, "the root CA")
    _add_output(p, default_days=1825)
    p.set_defaults(run=_cmd_org)

    p = sub.add_parser(
        "node",
        help="create a node certificate signed by an organisation CA",
        description="Create a node certificate signed by an organisation CA: NAME.pem (the node's "
        "certificate, then the organisation's) and NAME.key.",
    )
    p.add_argument(
        "-n", "--name", required=True, help="the node's DNS name, e.g. worker-1 (CN and SAN)"
    )
    _add_ca(p, "the organisation CA")
    _add_output(p, default_days=365)
    p.set_defaults(run=_cmd_node)

    p = sub.add_parser(
        "revoke",
        help="add a certificate to its CA's CRL",
        description="Add the certificate in FILE (its first, if several) to the CRL of the CA "
        "that issued it, creating the CRL when missing.",
    )
    _add_ca(p, "the CA that issued the certificate")
    p.add_argument("--cert", required=True, metavar="FILE", help="the certificate to revoke")
    p.add_argument("--crl", metavar="FILE", help="the CRL to update (default: CA.crl.pem)")
    p.add_argument("--reason", choices=sorted(_REASONS), help="the reason code to record")
    p.add_argument("--days", type=int, default=30, help="days until nextUpdate (default: 30)")
    p.set_defaults(run=_cmd_revoke)

    p = sub.add_parser(
        "crl",
        help="write or renew a CA's CRL",
        description="Write the CRL of a CA, keeping the entries of an existing one, with a fresh "
        "nextUpdate. Peers that check CRLs reject the CA's certificates once nextUpdate has "
        "passed: run this before then.",
    )
    _add_ca(p, "the CA")
    p.add_argument("--crl", metavar="FILE", help="the CRL to write (default: CA.crl.pem)")
    p.add_argument("--days", type=int, default=30, help="days until nextUpdate (default: 30)")
    p.set_defaults(run=_cmd_crl)
    return parser


def _add_ca(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--ca",
        required=True,
        metavar="DIR/NAME",
        help=f"{what}: the path of its files without extension (reads NAME.pem and NAME.key)",
    )


def _add_output(p: argparse.ArgumentParser, *, default_days: int) -> None:
    p.add_argument(
        "--out-dir", default=".", metavar="DIR", help="where to write the files (default: .)"
    )
    p.add_argument(
        "--days", type=int, default=default_days, help=f"validity in days (default: {default_days})"
    )
    p.add_argument("--force", action="store_true", help="overwrite existing files")


# --------------------------------------------------------------------------------------------
# Commands


def _cmd_root(args: argparse.Namespace) -> None:
    root = create_root(args.name, days=args.days)
    _write_identity(args, root)


def _cmd_org(args: argparse.Namespace) -> None:
    root = _load_ca(args.ca)
    org = create_org(root, args.name, days=args.days)
    crl_path = _outputs(args, org.name)[2]
    _check_free(args, crl_path)
    _write_identity(args, org)
    crl = create_crl(org)
    write_crl(crl_path, crl)
    _report_crl(crl_path, crl)


def _cmd_node(args: argparse.Namespace) -> None:
    org = _load_ca(args.ca)
    _write_identity(args, create_node(org, args.name, days=args.days))


def _cmd_revoke(args: argparse.Namespace) -> None:
    ca = _load_ca(args.ca)
    crl_path = args.crl or f"{_ca_prefix(args.ca)}.crl.pem"
    target = load_certificates(args.cert)[0]
    if target.issuer != ca.cert.subject or not _issued_by(target, ca.cert):
        raise PKIError(
            f"certificate {args.cert} was not issued by CA {ca.name!r} (its issuer is "
            f"{target.issuer.rfc4514_string()!r}) — revoke it with that CA"
        )
    previous = _load_crl(crl_path, ca) if os.path.exists(crl_path) else None
    if previous is not None:
        entry = previous.get_revoked_certificate_by_serial_number(target.serial_number)
        if entry is not None:
            print(
                f"{args.cert}: serial {target.serial_number:x} already revoked on "
                f"{_iso(entry.revocation_date_utc)} in {crl_path}; nothing to do"
            )
            return
    reason = _REASONS[args.reason] if args.reason else None
    crl = create_crl(
        ca, [revoked_entry(target.serial_number, reason=reason)], previous=previous, days=args.days
    )
    write_crl(crl_path, crl)
    print(
        f"revoked {args.cert}: {target.subject.rfc4514_string()} serial {target.serial_number:x}"
        + (f" ({args.reason})" if args.reason else "")
    )
    _report_crl(crl_path, crl)


def _cmd_crl(args: argparse.Namespace) -> None:
    ca = _load_ca(args.ca)
    crl_path = args.crl or f"{_ca_prefix(args.ca)}.crl.pem"
    previous = _load_crl(crl_path, ca) if os.path.exists(crl_path) else None
    crl = create_crl(ca, previous=previous, days=args.days)
    write_crl(crl_path, crl)
    _report_crl(crl_path, crl)


# --------------------------------------------------------------------------------------------
# Helpers


def _ca_prefix(ca: str) -> str:
    # Accept the CA's certificate or key path too (`--ca certs/acme.pem`), a natural slip.
    for ext in (".pem", ".key"):
        if ca.endswith(ext) and not os.path.exists(f"{ca}.pem"):
            return ca[: -len(ext)]
    return ca


def _load_ca(ca: str) -> Identity:
    prefix = _ca_prefix(ca)
    cert_path, key_path = f"{prefix}.pem", f"{prefix}.key"
    if not os.path.exists(cert_path) and not os.path.exists(key_path):
        raise PKIError(
            f"no CA at {ca}: neither {cert_path} nor {key_path} exists "
            "(--ca takes the path of the CA's files without extension, e.g. certs/acme)"
        )
    return load_identity(cert_path, key_path)


def _load_crl(path: str, ca: Identity) -> x509.CertificateRevocationList:
    crls = [c for c in load_crls(path) if c.issuer == ca.cert.subject]
    if len(crls) != 1:
        raise PKIError(
            f"{path}: expected one CRL of CA {ca.name!r}, found {len(crls)}; "
            "pass --crl with that CA's CRL file"
        )
    return crls[0]


def _outputs(args: argparse.Namespace, name: str) -> tuple[str, str, str]:
    base = os.path.join(args.out_dir, name)
    return f"{base}.pem", f"{base}.key", f"{base}.crl.pem"


def _check_free(args: argparse.Namespace, *paths: str) -> None:
    # Checked before anything is written, so that a refusal leaves no half-written set of files.
    # (write_* check again, atomically, with O_EXCL.)
    if args.force:
        return
    for path in paths:
        if os.path.lexists(path):
            raise PKIError(f"{path} exists; pass --force to overwrite")


def _write_identity(args: argparse.Namespace, ident: Identity) -> None:
    cert_path, key_path, _ = _outputs(args, ident.name)
    _check_free(args, cert_path, key_path)
    try:
        os.makedirs(args.out_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"cannot create --out-dir {args.out_dir} ({exc.strerror})") from None
    write_private_key(key_path, ident.key, force=args.force)
    write_certificates(cert_path, [ident.cert, *ident.chain], force=args.force)
    cert = ident.cert
    print(f"wrote {key_path}: Ed25519 private key (mode 0600)")
    print(
        f"wrote {cert_path}: {cert.subject.rfc4514_string()} serial {cert.serial_number:x} "
        f"not after {_iso(cert.not_valid_after_utc)}"
        + (f" (+{len(ident.chain)} issuer cert)" if ident.chain else "")
    )


def _report_crl(path: str, crl: x509.CertificateRevocationList) -> None:
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    next_update = crl.next_update_utc
    print(
        f"wrote {path}: CRL #{number} of {crl.issuer.rfc4514_string()}, {len(crl)} revoked, "
        f"next update {_iso(next_update) if next_update else 'never'}"
    )
