"""hypha.net: the network layer — py-libp2p on trio, secured by CA-signed mutual TLS.

- :func:`open_network` starts a node and yields its :class:`Network` handle: dial peers, the
  Kademlia DHT (``put``/``get``/``provide``/``find_providers``/``find_peer``), Gossipsub
  (``subscribe``/``publish``), versioned request/response protocols (``serve``/``request``) and
  tensor streams (``open_tensor_stream``/``on_tensor_stream``).
- :class:`MTLSTransport` is the only security transport; :class:`TLSFiles` names its PEM files.

docs/design/2026-11-24-secure-network.md explains the design and the measurements behind it.
"""

from hypha.net._network import (
    DialError,
    Message,
    Network,
    NetworkClosed,
    NetworkSettings,
    Subscription,
    open_network,
    settings_from_sections,
)
from hypha.net._rpc import Protocol, RemoteError, RequestRejected, ResponseTooLarge, RPCError
from hypha.net._tensor_stream import IncomingTensorStream, OutgoingTensorStream, TensorStreamError
from hypha.net._tls import MTLSTransport, PeerRefused, TLSFiles, peer_id_from_certificate

__all__ = [
    "DialError",
    "IncomingTensorStream",
    "MTLSTransport",
    "Message",
    "Network",
    "NetworkClosed",
    "NetworkSettings",
    "OutgoingTensorStream",
    "PeerRefused",
    "Protocol",
    "RPCError",
    "RemoteError",
    "RequestRejected",
    "ResponseTooLarge",
    "Subscription",
    "TLSFiles",
    "TensorStreamError",
    "open_network",
    "peer_id_from_certificate",
    "settings_from_sections",
]
