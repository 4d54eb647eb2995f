"""The learner ranks' rendezvous: a store that does not answer, and a rank that never comes,
are named within the deadline."""
import socket
import time

import pytest

from common.rendezvous import Rendezvous, RendezvousHost


def test_a_rank_whose_rendezvous_store_does_not_answer_fails_within_the_deadline_naming_the_store():
    with socket.socket() as taken:   # bound, never listening: every connect is refused, nobody else gets the port
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        t = time.monotonic()
        with pytest.raises(ConnectionError, match=rf"learner rank 1 could not reach the rendezvous store at "
                                                  rf"127.0.0.1:{port} within 2s"):
            Rendezvous("127.0.0.1", port).join("gloo", rank=1, world_size=2, timeout_s=2)
        assert time.monotonic() - t < 30


def test_a_rank_that_never_comes_is_named_by_those_waiting_for_it():
    host = RendezvousHost("127.0.0.1")
    with pytest.raises(ConnectionError, match=r"learner rank 0: rank\(s\) \[1, 2\] of 3 did not reach the "
                                              rf"rendezvous store at 127.0.0.1:{host.rendezvous().port} within 1s"):
        host.rendezvous().join("gloo", rank=0, world_size=3, timeout_s=1)
