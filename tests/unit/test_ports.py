"""Free ports for the services the tests start: several asked at once are distinct, and each can be bound."""

from __future__ import annotations

import socket

from safemerge.cluster.processes import free_ports


def test_free_ports_asked_together_are_distinct_and_bindable():
    for _ in range(50):  # one probe per port, all bound at once, so no two can be handed the same port
        ports = free_ports(6)
        assert len(set(ports)) == 6
    for port in ports:
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))
