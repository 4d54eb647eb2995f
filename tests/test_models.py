"""Publishing a converted model folder (launch/models.py): first come, first kept; what killed
conversions left behind is cleared."""
import os
import time

import pytest

from launch.models import STALE_PARTIAL_S, publish_folder


def _model_folder(path, marker: str):
    path.mkdir()
    (path / "config.json").write_text(marker)
    return path


def test_the_first_folder_published_is_kept_and_a_killed_conversions_leftovers_go(tmp_path):
    target = tmp_path / "owner--model"
    killed = _model_folder(tmp_path / "owner--model.partial-killed", "{}")
    old = time.time() - STALE_PARTIAL_S - 60
    os.utime(killed, (old, old))
    running = _model_folder(tmp_path / "owner--model.partial-running", "{}")   # another conversion, under way
    first = _model_folder(tmp_path / "owner--model.partial-first", '{"first": true}')
    assert publish_folder(first, target) == target
    assert (target / "config.json").read_text() == '{"first": true}' and not first.exists()
    assert not killed.exists() and running.exists()
    second = _model_folder(tmp_path / "owner--model.partial-second", '{"second": true}')
    assert publish_folder(second, target) == target   # too late: the first is kept
    assert (target / "config.json").read_text() == '{"first": true}'


def test_a_target_in_the_way_that_is_no_model_is_an_error(tmp_path):
    target = tmp_path / "owner--model"
    target.mkdir()
    (target / "stray.txt").write_text("x")
    with pytest.raises(OSError):
        publish_folder(_model_folder(tmp_path / "owner--model.partial-a", "{}"), target)
