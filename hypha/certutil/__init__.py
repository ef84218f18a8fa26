"""hypha.certutil: the certificates of a Hypha network, and the ``hypha certutil`` tool.

A root CA signs organisation CAs; each organisation signs its nodes' certificates and keeps a CRL
of the ones it revoked. Nodes present ``(node cert, org cert)`` in TLS and trust the root. All
keys are Ed25519; all files PEM. See ``hypha certutil --help`` for the command line.

    >>> root = create_root("hypha")
    >>> org = create_org(root, "acme")
    >>> node = create_node(org, "worker-1")
    >>> node.chain == (org.cert,)
    True
"""

from hypha.certutil._cli import main
from hypha.certutil._pki import (
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

__all__ = [
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
