"""The learner ranks' rendezvous: a store that is gone is named within the deadline."""
import time

import pytest

from learner.rendezvous import RendezvousHost


def test_a_rank_whose_rendezvous_store_is_gone_fails_within_the_deadline_naming_the_store():
    host = RendezvousHost("127.0.0.1")
    rendezvous = host.rendezvous()
    del host   # the store closes with its host; nobody listens on its port now
    t = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"learner rank 1 could not reach the learner rendezvous store at "
                                              rf"127.0.0.1:{rendezvous.port} within 2s"):
        rendezvous.join("gloo", rank=1, world_size=2, timeout_s=2)
    assert time.monotonic() - t < 30
