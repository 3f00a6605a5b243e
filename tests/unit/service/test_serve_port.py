"""`lorafleet api`'s port checks (lorafleet/service/serve.py) on real sockets."""

import socket
import time

import pytest

from lorafleet.service.serve import ServiceError, claim_port, port_in_use


def _served_and_closed(reuse_address: bool) -> int:
    """A port whose server accepted one connection and closed it first, as a stopped server leaves it."""
    server = socket.socket()
    if reuse_address:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server's side closes first: its socket waits in TIME_WAIT
    time.sleep(0.1)
    client.close()
    server.close()
    return port


def test_a_listening_port_is_refused_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ServiceError, match=f"--port {port}: 127.0.0.1:{port} is already in use"):
            claim_port("127.0.0.1", port, timeout=30)
        assert time.monotonic() - started < 5


def test_lingering_connections_are_waited_for_not_refused(capsys):
    # What Serve's replica leaves behind: its listener without SO_REUSEADDR, so the port cannot be bound for ~60 s.
    port = _served_and_closed(reuse_address=False)
    assert port_in_use("127.0.0.1", port)
    with pytest.raises(ServiceError, match="stayed taken for 1 s"):
        claim_port("127.0.0.1", port, timeout=1)
    assert "waiting for a previous server's connections to close" in capsys.readouterr().err
    # A server that set SO_REUSEADDR (uvicorn's own) leaves a port that can be bound at once.
    claim_port("127.0.0.1", _served_and_closed(reuse_address=True), timeout=0)
