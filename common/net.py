"""Ports."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` ("" for every interface) that nobody listens on now. Another process
    may take it before the caller binds it: for rendezvous and tests, not for a server, which
    should bind port 0 itself."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
