"""Throw-away PKIs for network tests: a root, an org, nodes, and the bad certificates to refuse."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from hypha.certutil import (
    Identity,
    create_crl,
    create_node,
    create_org,
    create_root,
    revoked_entry,
    write_certificates,
    write_crl,
    write_private_key,
)
from hypha.net import NetworkSettings, TLSFiles


@dataclass
class PKI:
    """A root and one org CA in ``directory``; ``node(name)`` writes a node's files."""

    directory: Path
    root: Identity = field(init=False)
    org: Identity = field(init=False)
    revoked: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.root = create_root("test-root")
        self.org = create_org(self.root, "test-org")
        write_certificates(self.trust, [self.root.cert])
        self.write_crl()

    @property
    def trust(self) -> Path:
        return self.directory / "root.pem"

    @property
    def crl(self) -> Path:
        return self.directory / "org.crl.pem"

    def write_crl(self) -> None:
        crl = create_crl(self.org, [revoked_entry(s) for s in self.revoked])
        write_crl(self.crl, crl)

    def revoke(self, identity: Identity) -> None:
        self.revoked.append(identity.cert.serial_number)
        self.write_crl()

    def files(self, identity: Identity, name: str, *, trust: Path | None = None,
              crl: bool = True) -> TLSFiles:
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        write_certificates(cert, [identity.cert, *identity.chain], force=True)
        write_private_key(key, identity.key, force=True)
        return TLSFiles(cert=cert, key=key, trust=trust or self.trust,
                        crl=(self.crl,) if crl else ())

    def node(self, name: str, **kwargs: object) -> tuple[Identity, TLSFiles]:
        identity = create_node(self.org, name, **kwargs)  # type: ignore[arg-type]
        return identity, self.files(identity, name)

    def expired_node(self, name: str) -> tuple[Identity, TLSFiles]:
        now = dt.datetime.now(dt.UTC)
        return self.node(name, not_before=now - dt.timedelta(days=10),
                         not_after=now - dt.timedelta(days=1))

    def settings(self, files: TLSFiles, **kwargs: object) -> NetworkSettings:
        kwargs.setdefault("listen", ("/ip4/127.0.0.1/tcp/0",))
        return NetworkSettings(tls=files, **kwargs)  # type: ignore[arg-type]
