"""Progress as a person sees it: a bar redrawn in place on a terminal, plain lines on a log."""
import io
import json

import pytest

from common.metrics import MetricsLogger
from common.progress import Progress, eta


class Terminal(io.StringIO):
    """What a terminal would be shown, control characters and all."""

    def isatty(self):
        return True


def test_on_a_log_a_piece_of_work_prints_one_line_at_its_start_and_one_at_its_end():
    log = io.StringIO()
    with Progress("starting 2 actor group(s)", 2, stream=log) as p:
        p.advance()
        p.advance()
    assert log.getvalue().splitlines() == ["asyncrl: starting 2 actor group(s) ...",
                                           "asyncrl: starting 2 actor group(s): done in 0s"]
    failed = io.StringIO()
    with pytest.raises(TimeoutError):
        with Progress("converting", 3, stream=failed):
            raise TimeoutError("disk")
    assert failed.getvalue().splitlines()[-1] == "asyncrl: converting: failed after 0s (TimeoutError)"


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_ends_with_a_line():
    screen = Terminal()
    with Progress("starting", 4, stream=screen) as p:
        p.advance(2)
    drawn = screen.getvalue()
    assert drawn.count("\r\x1b[K") == 3 and "[############------------] 2/4" in drawn
    assert drawn.endswith("asyncrl: starting: done in 0s\n") and drawn.count("\n") == 1
    assert eta(started=0.0, done=1, total=4, now=10.0) == " | eta 30s" and eta(0.0, 0, 4, 1.0) == ""


def test_training_steps_on_a_terminal_keep_one_bar_with_evaluations_printed_above(tmp_path):
    screen = Terminal()
    logger = MetricsLogger(tmp_path, total_steps=3, stream=screen)
    logger.log({"step": 1, "reward/mean": 0.1})
    logger.log({"step": 2, "reward/mean": 0.2})
    logger.log_eval({"step": 2, "weights/version": 2, "eval/reward": 0.5, "eval/tasks": 8})
    logger.log({"step": 3, "reward/mean": 0.3})
    logger.close()
    lines = screen.getvalue().split("\n")
    # what stays on the screen: the evaluation (the bar at that moment erased), then the last bar
    assert lines[0].rsplit("\r\x1b[K", 1)[-1].startswith("eval of step 2 (version 2) | held-out reward 0.500")
    assert lines[1].rsplit("\r\x1b[K", 1)[-1].startswith("[########################] step 3/3 | reward 0.300")
    assert lines[2] == ""
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in rows] == [1, 2, 2, 3]   # the file, as on a log


def test_training_steps_on_a_log_print_one_summary_line_each(tmp_path):
    log = io.StringIO()
    logger = MetricsLogger(tmp_path, total_steps=2, stream=log)
    logger.log({"step": 1, "reward/mean": 0.1})
    logger.log({"step": 2, "reward/mean": 0.2})
    logger.close()
    lines = log.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 1/2", "step 2/2"]
    assert "\r" not in log.getvalue() and "#" not in log.getvalue()
