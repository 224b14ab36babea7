"""Child-process helpers."""

import socket

from sealnet.processes import free_port


def test_free_port_never_hands_out_a_port_twice():
    """Triton refuses to start when two of its ports coincide; the kernel may offer a just-released port again."""
    ports = [free_port() for _ in range(100)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:  # and each was free when handed out
        s.bind(("127.0.0.1", ports[-1]))
