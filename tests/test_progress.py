"""compclip.progress: plain lines with hand-computed numbers on a non-terminal stream (a fake clock, no sleeping),
a real tqdm bar on a real pseudo-terminal, and the choice between them made from real file descriptors."""
import fcntl
import io
import logging
import os
import select
import struct
import termios

import pytest

from compclip.progress import Progress, default_interval, format_duration, format_rate, track


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _lines(stream):
    text = stream.getvalue()
    assert "\r" not in text  # no tqdm frames in a log
    return text.splitlines()


def test_plain_lines_every_interval_with_rate_elapsed_and_eta():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(100, "job", unit="rows", interval=30, stream=out, clock=clock)
    assert progress.mode == "lines"
    for at, n in ((10, 10), (30, 20), (45, 15), (60, 15)):
        clock.now = 1000 + at
        progress.update(n)
    clock.now = 1075
    progress.close()
    progress.update(5)  # after close: ignored
    # t=30: 30 rows in 30 s = 1/s, 70 left -> 70 s; t=45 is 15 s after the last line: nothing;
    # t=60: 60 rows, 1/s, 40 left; close at t=75: 60 rows in 75 s = 0.8/s = 48/min.
    assert _lines(out) == [
        "job: 30/100 rows (30.0%) | 1.0 rows/s | elapsed 0:00:30 | ETA 0:01:10",
        "job: 60/100 rows (60.0%) | 1.0 rows/s | elapsed 0:01:00 | ETA 0:00:40",
        "job: 60/100 rows (60.0%) | 48.0 rows/min | elapsed 0:01:15 | done",
    ]


def test_resumed_job_rates_only_this_sessions_work_and_shows_postfix():
    clock, out = FakeClock(), io.StringIO()
    with Progress(100, "train", unit="steps", initial=40, interval=0, stream=out, clock=clock) as progress:
        clock.now += 20
        progress.update(20, loss=0.123456, epoch=2)  # 20 steps in 20 s (not 60): 1/s, 40 left
    assert _lines(out) == [
        "train: 60/100 steps (60.0%) | 1.0 steps/s | elapsed 0:00:20 | ETA 0:00:40 | loss=0.1235 epoch=2",
        "train: 60/100 steps (60.0%) | 1.0 steps/s | elapsed 0:00:20 | done | loss=0.1235 epoch=2",
    ]
    stats = progress.stats()
    assert (stats.done, stats.total, stats.elapsed, stats.rate, stats.eta) == (60, 100, 20, 1.0, 40)


def test_unknown_total_slow_rates_and_short_transient_jobs():
    clock, out = FakeClock(), io.StringIO()
    with Progress(None, "study", unit="runs", interval=60, stream=out, clock=clock) as progress:
        clock.now += 900  # one run in 15 minutes = 4 runs an hour
        progress.update()
    assert _lines(out)[0] == "study: 1 runs | 4.0 runs/h | elapsed 0:15:00"
    quiet = io.StringIO()
    with Progress(10, "embed", leave=False, interval=30, stream=quiet, clock=clock) as progress:
        clock.now += 5
        progress.update(10)
    assert quiet.getvalue() == ""  # shorter than one interval and not left: nothing in the log
    with Progress(10, "embed", leave=False, interval=30, stream=quiet, clock=clock) as progress:
        clock.now += 40
        progress.update(4)
    assert len(_lines(quiet)) == 2  # a long transient job: its line and the closing one


def test_lines_through_a_logger(caplog):
    clock = FakeClock()
    logger = logging.getLogger("compclip.test_progress")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with Progress(4, "prepare", unit="rows", interval=0, logger=logger, stream=io.StringIO(), clock=clock) as p:
            clock.now += 2
            p.update(2)
    messages = [record.getMessage() for record in caplog.records if record.name == logger.name]
    assert messages[0] == "prepare: 2/4 rows (50.0%) | 1.0 rows/s | elapsed 0:00:02 | ETA 0:00:02"
    assert messages[-1].endswith("| done")


def _read_all(fd):
    chunks = []
    while select.select([fd], [], [], 0.1)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.parametrize("columns", [0, 100])  # a bare pseudo-terminal reports 0 columns; a window has some
def test_real_terminal_gets_a_tqdm_bar_and_a_pipe_gets_lines(columns):
    controller, terminal_fd = os.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    terminal = os.fdopen(terminal_fd, "w")
    try:
        progress = Progress(5, "embed", unit="images", interval=0, stream=terminal)
        assert progress.mode == "bar"
        for _ in range(3):
            progress.update(1)
        progress.close()
        terminal.flush()
        shown = _read_all(controller)
    finally:
        terminal.close()
        os.close(controller)
    assert "\r" in shown and "embed: " in shown and "3/5" in shown  # tqdm redraws the line in place
    assert "elapsed" not in shown  # and no plain lines

    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as pipe:
        progress = Progress(5, "embed", unit="images", interval=0, stream=pipe)
        assert progress.mode == "lines"
        progress.update(5)
        progress.close()
    with os.fdopen(read_fd) as reader:
        written = reader.read()
    assert "\r" not in written and written.startswith("embed: 5/5 images (100.0%)")


def test_disabled_shows_nothing_anywhere():
    controller, terminal_fd = os.openpty()
    with os.fdopen(terminal_fd, "w") as terminal:
        with Progress(3, "rank 1", enabled=False, stream=terminal) as progress:
            progress.update(3)
        assert progress.mode == "off"
    os.close(controller)
    out, clock = io.StringIO(), FakeClock()
    with Progress(4, "rank 1", enabled=False, interval=0, stream=out, clock=clock) as progress:
        clock.now += 6
        progress.update(3)
    assert out.getvalue() == ""
    assert progress.stats()[:4] == (3, 4, 6, 0.5)  # still counted, for the caller's own log lines


def test_track_counts_items_and_forced_modes():
    out = io.StringIO()
    assert list(track(range(7), desc="items", interval=3600, stream=out)) == list(range(7))
    assert _lines(out)[0].startswith("items: 7/7 it (100.0%)")
    assert Progress(1, stream=io.StringIO(), tty=True).mode == "bar"
    assert Progress(1, stream=io.StringIO(), tty=False).mode == "lines"


def test_interval_from_the_environment_and_formats(monkeypatch):
    monkeypatch.delenv("COMPCLIP_PROGRESS_INTERVAL", raising=False)
    assert default_interval() == 30.0
    monkeypatch.setenv("COMPCLIP_PROGRESS_INTERVAL", "5")
    assert default_interval() == 5.0 and Progress(1, stream=io.StringIO()).interval == 5.0
    monkeypatch.setenv("COMPCLIP_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="COMPCLIP_PROGRESS_INTERVAL='soon'"):
        default_interval()
    assert format_duration(3 * 3600 + 25 * 60 + 7.4) == "3:25:07"
    assert format_duration(30 * 3600) == "30:00:00"
    assert format_rate(2.5, "images") == "2.5 images/s"
    assert format_rate(0.5, "steps") == "30.0 steps/min"


def test_prepare_in_a_batch_log_prints_plain_progress_lines(tmp_path, monkeypatch, caplog, capsys):
    """compclip-prepare with its stderr not a terminal (as under SLURM): plain lines, where it printed nothing."""
    from PIL import Image

    from compclip.data import prepare

    captions = ["A dog chases a red ball.", "A woman holds a blue umbrella.", "Two cats sleep on a sofa.",
                "A man rides a brown horse.", "A small boat floats on calm water."]
    rows = []
    for index, caption in enumerate(captions):
        Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(tmp_path / f"{index}.png")
        rows.append(f'{{"image": "{index}.png", "caption": "{caption}"}}\n')
    (tmp_path / "in.jsonl").write_text("".join(rows))
    monkeypatch.setenv("COMPCLIP_PROGRESS_INTERVAL", "0")  # a line at every update
    with caplog.at_level(logging.INFO, logger="compclip.prepare"):
        prepare.main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                      "--types", "attribute_replace", "--no-concepts", "--chunk-size", "2", "--batch-size", "2"])
    lines = [record.getMessage() for record in caplog.records if record.name == "compclip.prepare"]
    chunks = [line for line in lines if line.startswith("prepare: ")]
    assert [line.split(" | ")[0] for line in chunks] == [
        "prepare: 2/5 rows (40.0%)", "prepare: 4/5 rows (80.0%)", "prepare: 5/5 rows (100.0%)",
        "prepare: 5/5 rows (100.0%)"]
    assert chunks[-1].split(" | ")[-1] == "done" and "ETA" in chunks[0]
    assert any(line.startswith("vocabulary: 5/5 captions (100.0%)") for line in lines)
    assert "\r" not in capsys.readouterr().err
