"""The buffer's benches run end to end (briefly), so that a change of the client or the wire
cannot leave them broken unnoticed: bench/buffer_throughput.py once was, for weeks."""
import json
import signal
import subprocess
import sys


def run(*args, timeout=240):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_buffer_throughput_runs_every_asyncrl_mode_against_raw_pyzmq():
    out = run("bench/buffer_throughput.py", "--seconds", "0.3", "--tokens", "64", "--no-ray")
    rows = {line[:12].strip(): line[12:].split() for line in out.splitlines()[1:]}   # name, then the figures
    assert set(rows) == {"raw pyzmq", "asyncrl", "asyncrl x8", "asyncrl w16"}, out
    assert all(float(figures[2]) > 0 for figures in rows.values()), out   # groups/s of each


def test_buffer_bench_reports_the_share_of_raw_pyzmq_for_both_sizes_with_the_issues_8_writers():
    out = run("-m", "bench.buffer_bench", "--systems", "asyncrl", "raw pyzmq", "--writers", "8", "--seconds", "0.5")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["zmq_share_items_4k"] > 0 and summary["zmq_share_mb_1m"] > 0, out
    assert summary["ratio_items_4k"] is None   # Ray's queue was not asked for
    assert (summary["window"], summary["coalesce"]) == (4, 128), summary


def test_buffer_bench_stopped_by_its_deadline_still_prints_what_it_measured():
    bench = subprocess.Popen([sys.executable, "-m", "bench.buffer_bench", "--systems", "raw pyzmq", "asyncrl",
                              "--writers", "2", "--seconds", "0.5"], stdout=subprocess.PIPE, text=True)
    try:
        lines = [bench.stdout.readline(), bench.stdout.readline()]   # the header, then the first case's row
        assert lines[1].startswith("raw pyzmq"), lines
        bench.send_signal(signal.SIGTERM)   # during the next case
        out, _ = bench.communicate(timeout=120)
    finally:
        bench.kill()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["cut_short"].startswith("stopped by SIGTERM in raw pyzmq at 1m with 2 writers"), summary
    assert bench.returncode == 0
