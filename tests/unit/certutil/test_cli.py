"""`hypha certutil` end to end: the files each command writes (checked by a TLS handshake that
loads them as a node would), --force, and that bad input is one line on stderr with exit status 2,
never a traceback."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hypha import cli
from hypha.certutil import load_certificates, load_crls, load_identity, load_private_key, main
from tests.unit.certutil._tls import context, handshake

PREFIX = "hypha certutil: error: "


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """Run argv, check it fails the documented way, return the error message."""
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(PREFIX), err
    return line[len(PREFIX) :]


@pytest.fixture
def certs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """certs/ with root 'hypha', org 'acme', nodes 'alice' and 'bob', made with the CLI."""
    d = tmp_path / "certs"
    assert run(capsys, "root", "--name", "hypha", "--out-dir", d)[0] == 0
    assert run(capsys, "org", "--name", "acme", "--ca", d / "hypha", "--out-dir", d)[0] == 0
    for name in ("alice", "bob"):
        assert run(capsys, "node", "-n", name, "--ca", d / "acme", "--out-dir", d)[0] == 0
    return d


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "certs"
    rc, out, _ = run(capsys, "root", "--name", "hypha", "--out-dir", d)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"wrote {d}/hypha.key: Ed25519 private key (mode 0600)"
    assert lines[1].startswith(f"wrote {d}/hypha.pem: CN=hypha serial ")
    assert " not after " in lines[1] and len(lines) == 2

    rc, out, _ = run(
        capsys, "org", "--name", "acme", "--ca", d / "hypha", "--out-dir", d, "--days", "20"
    )
    assert rc == 0
    assert out.splitlines()[2].startswith(
        f"wrote {d}/acme.crl.pem: CRL #1 of O=acme,CN=acme, 0 revoked"
    )
    rc, out, _ = run(capsys, "node", "-n", "worker-1", "--ca", d / "acme", "--out-dir", d)
    assert rc == 0
    assert "(+1 issuer cert)" in out

    assert sorted(os.listdir(d)) == [
        "acme.crl.pem", "acme.key", "acme.pem", "hypha.key", "hypha.pem", "worker-1.key", "worker-1.pem",
    ]  # fmt: skip
    for key in ("hypha.key", "acme.key", "worker-1.key"):
        assert mode(d / key) == 0o600
        load_private_key(d / key)
    assert mode(d) == 0o700
    root = load_certificates(d / "hypha.pem")
    org = load_certificates(d / "acme.pem")
    node = load_identity(d / "worker-1.pem", d / "worker-1.key")
    assert len(root) == 1 and len(org) == 1
    assert node.chain == (org[0],) and node.name == "worker-1"
    org[0].verify_directly_issued_by(root[0])
    # --days is honoured
    delta = org[0].not_valid_after_utc - org[0].not_valid_before_utc
    assert delta.days == 20
    [crl] = load_crls(d / "acme.crl.pem")
    assert crl.issuer == org[0].subject and len(crl) == 0


def tls_with_files(d: Path, client: str, server: str, *, crl: Path | None) -> None:
    """Handshake between two nodes loading the CLI's files as they are."""
    trust = (d / "hypha.pem").read_text()
    kw = {"trust": trust, "crl_files": [crl] if crl else [], "crl_check": crl is not None}
    c = context(ssl.PROTOCOL_TLS_CLIENT, (d / f"{client}.pem", d / f"{client}.key"), **kw)  # type: ignore[arg-type]
    s = context(ssl.PROTOCOL_TLS_SERVER, (d / f"{server}.pem", d / f"{server}.key"), **kw)  # type: ignore[arg-type]
    handshake(c, s, server)


def test_revoke_and_renew(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = certs
    crl_path = d / "acme.crl.pem"
    tls_with_files(d, "alice", "bob", crl=crl_path)  # the org's empty CRL accepts its nodes

    rc, out, _ = run(
        capsys, "revoke", "--ca", d / "acme", "--cert", d / "bob.pem", "--reason", "key-compromise"
    )
    assert rc == 0
    bob = load_certificates(d / "bob.pem")[0]
    assert out.splitlines()[0] == (
        f"revoked {d}/bob.pem: O=acme,CN=bob serial {bob.serial_number:x} (key-compromise)"
    )
    assert "CRL #2" in out and "1 revoked" in out
    [crl] = load_crls(crl_path)
    entry = crl.get_revoked_certificate_by_serial_number(bob.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate revoked"):
        tls_with_files(d, "alice", "bob", crl=crl_path)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate revoked"):
        tls_with_files(d, "bob", "alice", crl=crl_path)

    # revoking twice changes nothing
    before = crl_path.read_bytes()
    rc, out, _ = run(capsys, "revoke", "--ca", d / "acme", "--cert", d / "bob.pem")
    assert rc == 0 and "already revoked" in out and "nothing to do" in out
    assert crl_path.read_bytes() == before

    # `crl` re-signs with a new number, keeping the entries
    rc, out, _ = run(capsys, "crl", "--ca", d / "acme", "--days", "7")
    assert rc == 0 and out.startswith(f"wrote {crl_path}: CRL #3 of O=acme,CN=acme, 1 revoked")
    [renewed] = load_crls(crl_path)
    assert renewed.get_revoked_certificate_by_serial_number(bob.serial_number) is not None
    assert renewed.next_update_utc is not None and renewed.last_update_utc is not None
    assert (renewed.next_update_utc - renewed.last_update_utc).days == 7
    tls_with_files(d, "alice", "alice", crl=crl_path)


def test_revoke_creates_a_missing_crl_and_the_root_revokes_orgs(
    certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = certs
    (d / "acme.crl.pem").unlink()
    assert run(capsys, "revoke", "--ca", d / "acme", "--cert", d / "alice.pem")[0] == 0
    assert len(load_crls(d / "acme.crl.pem")[0]) == 1
    # the root revokes an org into the root's CRL; --crl picks another file; --ca may name the .pem
    rc, out, _ = run(
        capsys, "revoke", "--ca", d / "hypha.pem", "--cert", d / "acme.pem", "--crl", d / "root.crl"
    )
    assert rc == 0, out
    [crl] = load_crls(d / "root.crl")
    assert crl.issuer == load_certificates(d / "hypha.pem")[0].subject and len(crl) == 1
    assert run(capsys, "crl", "--ca", d / "hypha")[0] == 0
    assert load_crls(d / "hypha.crl.pem")[0].issuer == crl.issuer


def test_force(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = certs
    old_key = (d / "alice.key").read_bytes()
    old_pem = (d / "alice.pem").read_bytes()
    msg = fails(capsys, "node", "-n", "alice", "--ca", d / "acme", "--out-dir", d)
    assert msg == f"{d}/alice.pem exists; pass --force to overwrite"
    assert (d / "alice.key").read_bytes() == old_key and (d / "alice.pem").read_bytes() == old_pem

    assert run(capsys, "node", "-n", "alice", "--ca", d / "acme", "--out-dir", d, "--force")[0] == 0
    assert (d / "alice.key").read_bytes() != old_key
    assert mode(d / "alice.key") == 0o600
    load_identity(d / "alice.pem", d / "alice.key")
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]

    # a refusal leaves nothing half-written: only the key missing, the cert still blocks
    (d / "bob.key").unlink()
    assert "bob.pem exists" in fails(
        capsys, "node", "-n", "bob", "--ca", d / "acme", "--out-dir", d
    )
    assert not (d / "bob.key").exists()
    # the org refuses when only its CRL exists
    (d / "other.crl.pem").write_text("x")
    msg = fails(capsys, "org", "--name", "other", "--ca", d / "hypha", "--out-dir", d)
    assert msg == f"{d}/other.crl.pem exists; pass --force to overwrite"
    assert not (d / "other.key").exists() and not (d / "other.pem").exists()


def test_bad_input(certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = certs
    # usage errors
    assert "required: --name" in fails(capsys, "root")
    assert "invalid choice" in fails(capsys, "frobnicate")
    assert "invalid int value" in fails(capsys, "root", "--name", "r", "--days", "x")
    rc, _, err = run(capsys)
    assert rc == 2 and "usage:" in err
    # bad names
    assert "invalid node name 'Bad_Name'" in fails(
        capsys, "node", "-n", "Bad_Name", "--ca", d / "acme"
    )
    assert "invalid root name 'a b'" in fails(
        capsys, "root", "--name", "a b", "--out-dir", tmp_path
    )
    assert "invalid days: 0" in fails(
        capsys, "root", "--name", "r", "--days", "0", "--out-dir", tmp_path
    )
    # the CA
    msg = fails(capsys, "node", "-n", "x", "--ca", d / "nope")
    assert msg.startswith(f"no CA at {d}/nope: neither {d}/nope.pem nor {d}/nope.key exists")
    (d / "bob.key").unlink()
    assert fails(capsys, "node", "-n", "x", "--ca", d / "bob") == f"{d}/bob.key: no such file"
    (d / "rsa.pem").write_bytes((d / "alice.pem").read_bytes())
    (d / "rsa.key").write_bytes(
        rsa.generate_private_key(65537, 1024).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    msg = fails(capsys, "node", "-n", "x", "--ca", d / "rsa")
    assert msg.startswith(f"{d}/rsa.key: not an Ed25519 PKCS#8 private key (found RSA-1024)")
    (d / "junk.pem").write_text("junk")
    (d / "junk.key").write_text("junk")
    assert "not a PEM file" in fails(capsys, "node", "-n", "x", "--ca", d / "junk")
    (d / "mix.pem").write_bytes((d / "alice.pem").read_bytes())
    (d / "mix.key").write_bytes((d / "acme.key").read_bytes())
    assert "does not hold the private key of certificate" in fails(
        capsys, "node", "-n", "x", "--ca", d / "mix"
    )
    assert "is not a CA certificate" in fails(capsys, "node", "-n", "x", "--ca", d / "alice")
    assert "'hypha' is a root CA" in fails(capsys, "node", "-n", "x", "--ca", d / "hypha")
    # revoking with the wrong CA
    msg = fails(capsys, "revoke", "--ca", d / "hypha", "--cert", d / "alice.pem")
    assert msg == (
        f"certificate {d}/alice.pem was not issued by CA 'hypha' (its issuer is 'O=acme,CN=acme') "
        "— revoke it with that CA"
    )
    # ...and a CRL file of another CA
    msg = fails(
        capsys, "revoke", "--ca", d / "acme", "--cert", d / "alice.pem", "--crl", d / "junk.pem"
    )
    assert "junk.pem: not a PEM file" in msg
    assert run(capsys, "crl", "--ca", d / "hypha")[0] == 0
    msg = fails(capsys, "crl", "--ca", d / "acme", "--crl", d / "hypha.crl.pem")
    assert msg.endswith(
        "expected one CRL of CA 'acme', found 0; pass --crl with that CA's CRL file"
    )
    assert "no such file" in fails(capsys, "revoke", "--ca", d / "acme", "--cert", d / "ghost.pem")


def test_dispatcher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["certutil", "root", "--name", "r", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "r.key").exists()
    assert cli.main(["certutil", "root", "--name", "r", "--out-dir", str(tmp_path)]) == 2
    assert "r.pem exists" in capsys.readouterr().err
    assert cli.main(["nope"]) == 2
    assert "hypha: error: unknown command 'nope' (choose from: certutil" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "certutil" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["certutil", "node", "--help"]) == 0
    assert "--ca DIR/NAME" in capsys.readouterr().out
    # every command is a module with main(argv)
    import importlib

    for module, _ in cli.COMMANDS.values():
        assert callable(importlib.import_module(module).main)


def test_python_dash_m(tmp_path: Path) -> None:
    env = {**os.environ, "HYPHA_NO_EXTENSION": "1"}  # skip loading torch: this tool needs none
    proc = subprocess.run(
        [sys.executable, "-m", "hypha.certutil", "node", "-n", "x", "--ca", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=Path(__file__).parents[3],
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{PREFIX}no CA at "), proc.stderr
