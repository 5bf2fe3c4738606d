"""Progress on a terminal (rich's bar) and in plain logs (periodic lines)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from weightsmith.progress import PlainProgress, clock_text, progress_display, progress_line, status


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_counts_and_estimates():
    assert progress_line("evaluating", 4, 16, 20.0) == "evaluating: 4/16 (25%), 0:20 elapsed, about 1:00 left"
    assert progress_line("evaluating", 0, 16, 3.0) == "evaluating: 0/16 (0%), 0:03 elapsed"
    assert progress_line("evaluating", 16, 16, 80.4) == "evaluating: 16/16 done in 1:20"
    assert progress_line("tensors", 7, None, 5.0) == "tensors: 7, 0:05 elapsed"
    assert clock_text(3725) == "1:02:05" and clock_text(59.6) == "1:00"


def test_plain_progress_writes_first_periodic_and_last_lines():
    stream, clock = io.StringIO(), FakeClock()
    with PlainProgress(stream, interval=10.0, clock=clock) as bar:
        task = bar.add_task("evaluating", total=None)
        for i in range(1, 9):
            clock.now += 3.0
            bar.update(task, completed=i, total=8)
            if i < 4:
                assert stream.getvalue() == ""  # nothing in the first interval: a failure stays one error line
    assert stream.getvalue().splitlines() == [
        "evaluating: 4/8 (50%), 0:12 elapsed, about 0:12 left",  # the first update after 10 s
        "evaluating: 8/8 done in 0:24",  # 12 s later, but the last update writes at once
    ]


def test_plain_progress_new_description_gets_a_line_and_advance_counts():
    stream, clock = io.StringIO(), FakeClock()
    bar = PlainProgress(stream, interval=60.0, clock=clock)
    task = bar.add_task("recipe", total=3)
    bar.update(task, completed=0, description="step 1/3: quantize")
    clock.now += 1.0
    bar.update(task, completed=1, description="step 2/3: merge")
    assert stream.getvalue() == ""  # a new phase before any line was due: still quiet
    clock.now += 60.0
    bar.update(task, completed=1)
    bar.update(task, completed=2, description="step 3/3: quantize")  # a new phase once lines show: at once
    clock.now += 1.0
    bar.advance(task)
    bar.update(task, completed=3)  # already finished: no second closing line
    assert stream.getvalue().splitlines() == [
        "step 2/3: merge: 1/3 (33%), 1:01 elapsed, about 2:02 left",
        "step 3/3: quantize: 2/3 (67%), 1:01 elapsed, about 0:30 left",
        "step 3/3: quantize: 3/3 done in 1:02",
    ]


def test_display_is_a_live_bar_on_a_terminal_and_plain_lines_elsewhere():
    assert isinstance(progress_display(Console(file=io.StringIO(), force_terminal=True)), Progress)
    plain_stream = io.StringIO()
    display = progress_display(Console(file=plain_stream, force_terminal=False))
    assert isinstance(display, PlainProgress) and display.stream is plain_stream


def test_status_is_one_plain_line_off_a_terminal():
    stream = io.StringIO()
    with status(Console(file=stream, force_terminal=False), "fetching the model"):
        pass
    assert stream.getvalue() == "fetching the model\n"


def test_plain_progress_a_finished_phase_does_not_silence_the_next():
    stream, clock = io.StringIO(), FakeClock()
    bar = PlainProgress(stream, interval=10.0, clock=clock)
    task = bar.add_task("search", total=None)
    clock.now += 11.0
    bar.update(task, completed=4, total=4, description="input Hessians")
    clock.now += 5.0
    bar.update(task, completed=1, total=8, description="sensitivity attn.0-7")
    bar.update(task, completed=1, total=8)  # same phase, within the interval: quiet
    assert stream.getvalue().splitlines() == [
        "input Hessians: 4/4 done in 0:11",
        "sensitivity attn.0-7: 1/8 (12%), 0:16 elapsed, about 1:52 left",
    ]
