"""Where an actor's time goes: the wall-clock is split by the first kind that held at each moment."""
import time

from actors.activity import SHARES, Activity, shares


def test_time_goes_to_the_first_kind_that_holds_and_the_shares_add_up_to_one():
    activity = Activity()
    start = activity.seconds()
    activity.begin("environment")
    time.sleep(0.1)                      # environment alone
    activity.begin("generation")
    time.sleep(0.1)                      # both: generation comes first
    activity.end("generation")
    activity.end("environment")
    with activity.doing("waiting"):
        time.sleep(0.1)
    time.sleep(0.05)                     # nothing: idle
    spent = activity.seconds()
    for kind in ("environment", "generation", "waiting"):
        assert 0.09 < spent[kind] - start[kind] < 0.2, (kind, spent)
    assert spent["buffer"] == 0 and spent["idle"] >= 0.04
    share = shares(start, spent)
    assert set(share) == set(SHARES) and abs(sum(share.values()) - 1) < 1e-9
    assert shares(spent, spent) == {}    # no time between the readings, no shares


def test_a_kind_that_fails_inside_doing_still_ends():
    activity = Activity()
    try:
        with activity.doing("buffer"):
            raise ConnectionError("buffer gone")
    except ConnectionError:
        pass
    before = activity.seconds()["buffer"]
    time.sleep(0.05)
    assert activity.seconds()["buffer"] == before   # no longer counted as buffer time


def test_a_steps_prefix_cache_share_is_of_the_prompt_tokens_since_the_last_step():
    from launch.async_grpo import actor_time
    before = {0: {"activity_s": {}, "prompt_tokens": 100, "prompt_tokens_cached": 40}}
    now = [{"actor_id": 0, "activity_s": {}, "prompt_tokens": 300, "prompt_tokens_cached": 190},
           {"actor_id": 1, "activity_s": {}, "prompt_tokens": 200, "prompt_tokens_cached": 50}]
    assert actor_time(now, before)["actor/prefix_cache_hit"] == (150 + 50) / (200 + 200)
    no_counts = [{"actor_id": 0, "activity_s": {}}]   # engines that do not count them (HF) add no key
    assert "actor/prefix_cache_hit" not in actor_time(no_counts, {})
