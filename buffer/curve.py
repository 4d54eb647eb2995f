"""CurveZMQ for a buffer that other hosts can reach (buffer.curve=true): every connection is
encrypted, and the server answers only clients that hold the job's client key pair.

The keys travel in the environment, never on a command line or in config.yaml:
ASYNCRL_BUFFER_CURVE holds "server_public,server_secret,client_public,client_secret" (Z85,
whose alphabet has no comma) for the server, and the same with the server's secret left
empty for the clients. The launcher makes a fresh set per job; `python -m buffer keys`
prints one for a buffer run by hand.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "ASYNCRL_BUFFER_CURVE"


class CurveError(ValueError):
    pass


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes   # b"" on the clients' side
    client_public: bytes
    client_secret: bytes

    @classmethod
    def generate(cls) -> "CurveKeys":
        import zmq

        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    def for_clients(self) -> "CurveKeys":
        return CurveKeys(self.server_public, b"", self.client_public, self.client_secret)

    def encode(self) -> str:
        return ",".join(k.decode() for k in (self.server_public, self.server_secret, self.client_public,
                                             self.client_secret))

    @classmethod
    def decode(cls, text: str) -> "CurveKeys":
        parts = text.split(",")
        if len(parts) != 4 or any(p and len(p) != 40 for p in parts) or not (parts[0] and parts[2] and parts[3]):
            raise CurveError(f"{ENV} must be four Z85 keys of 40 characters joined by ',' (the server's "
                             "secret may be empty on clients); `python -m buffer keys` makes a set")
        return cls(*(p.encode() for p in parts))

    @classmethod
    def from_env(cls) -> "CurveKeys | None":
        text = os.environ.get(ENV, "")
        return cls.decode(text) if text else None


def secure_server(context, sockets: list, keys: CurveKeys):
    """Make each of `sockets` a CURVE server that admits only the job's client key; returns the
    authenticator (one per context: stop() it when the sockets close)."""
    from zmq.auth.thread import ThreadAuthenticator

    if not keys.server_secret:
        raise CurveError(f"{ENV} holds no server secret: a buffer server needs the full set")

    class JobClients:
        def callback(self, domain, client_key):
            return client_key == keys.client_public

    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback("*", credentials_provider=JobClients())
    for socket in sockets:
        socket.curve_secretkey, socket.curve_publickey = keys.server_secret, keys.server_public
        socket.curve_server = True
    return authenticator


def secure_client(socket, keys: CurveKeys) -> None:
    """Make `socket` a CURVE client of the server whose public key `keys` holds."""
    socket.curve_serverkey = keys.server_public
    socket.curve_publickey, socket.curve_secretkey = keys.client_public, keys.client_secret
