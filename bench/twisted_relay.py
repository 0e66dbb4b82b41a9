"""The bench's ``twisted-tcp`` reference: Twisted's own TCP relay, and nothing else.

``twisted.protocols.portforward`` on the same reactor twisted_novnc runs on, with no
WebSocket, no session lookup and no logging (TCP_NODELAY on both sides, as socat and
twisted_novnc have).  Its figures are the floor of the stack: what any relay built on
Twisted's reactor pays per connection and per message on this machine before doing anything
of its own.

    python bench/twisted_relay.py LISTEN_PORT TARGET_PORT
"""

from __future__ import annotations

import sys

from twisted.internet import endpoints, reactor
from twisted.protocols import portforward


class _VMSide(portforward.ProxyClient):
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        super().connectionMade()


class _VMSideFactory(portforward.ProxyClientFactory):
    noisy = False
    protocol = _VMSide


class _ClientSide(portforward.ProxyServer):
    clientProtocolFactory = _VMSideFactory

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        super().connectionMade()


def main(listen_port: int, target_port: int) -> None:
    factory = portforward.ProxyFactory("127.0.0.1", target_port)
    factory.protocol = _ClientSide
    factory.noisy = False
    endpoint = endpoints.serverFromString(
        reactor, f"tcp:{listen_port}:interface=127.0.0.1:backlog=4096"
    )
    endpoint.listen(factory)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
