"""The run's figures (pipeline/plots.py), drawn to PNG files by a process of its own.

Importing matplotlib (about 0.35 s) and drawing a figure (about 0.15 s) took 7 % of a 1-epoch
`pipeline train` on 2 cores, all of it while the user waited (docs/BENCHMARKS.md). The drawing process is
started when a tracked run starts: it imports matplotlib on another core while this process trains, then
draws while this one goes on. This process never imports matplotlib.

    drawing.start()                                                        # early: the import happens meanwhile
    figure = drawing.draw("learning_curves", history, "val_accuracy")    # queued, returns at once
    log_png(run, figure.png(), "plots/learning_curves.png")                # waits for that figure's file

One process serves the whole interpreter, one figure at a time, in the order asked. It runs in a session of
its own, so that Ctrl-C in a terminal reaches this process alone (whose exit ends it), and it ends when this
process does: at exit, or when its standard input closes (this process killed).
"""

from __future__ import annotations

import atexit
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["DrawingError", "QueuedFigure", "draw", "start"]


class DrawingError(RuntimeError):
    """A figure could not be drawn; the message names it and says why."""


class _Drawer:
    """The drawing process, and the folder its PNG files are written to."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="pipeline-figures-"))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.drawing", str(self.folder)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.asked = 0  # figures asked for, in order
        self.answers: list[str | None] = []  # their outcomes as read so far: None when drawn, else the error

    def ask(self, plot: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> QueuedFigure:
        path = self.folder / f"{self.asked}-{plot}.png"
        assert self.process.stdin is not None
        try:
            pickle.dump((plot, args, kwargs, str(path)), self.process.stdin)
            self.process.stdin.flush()
        except BrokenPipeError:  # it ended: the error is read where the figure is waited for
            pass
        self.asked += 1
        return QueuedFigure(self, self.asked - 1, plot, path)

    def answer(self, index: int) -> str | None:
        """The outcome of figure `index`, waiting for it (the process answers in the order asked)."""
        assert self.process.stdout is not None
        while len(self.answers) <= index:
            try:
                self.answers.append(pickle.load(self.process.stdout))
            except EOFError:
                return f"the drawing process ended (exit code {self.process.wait()}; what it printed is above)"
        return self.answers[index]

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()  # it reads the end of its input, removes the folder and exits
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)  # where it was killed


@dataclass(frozen=True)
class QueuedFigure:
    """A figure asked for; `png()` waits until it is drawn."""

    drawer: _Drawer
    index: int
    plot: str
    path: Path

    def png(self) -> Path:
        """The PNG file (removed when the process exits: log or copy it); DrawingError if it failed."""
        error = self.drawer.answer(self.index)
        if error is not None:
            raise DrawingError(f"the figure {self.plot!r} could not be drawn: {error}")
        return self.path


_drawer: _Drawer | None = None


def start() -> None:
    """Start the drawing process now, if it is not running, so that it is ready by the time figures are asked for."""
    global _drawer
    if _drawer is None or _drawer.process.poll() is not None:
        _drawer = _Drawer()
        atexit.register(_drawer.close)


def draw(plot: str, *args: Any, **kwargs: Any) -> QueuedFigure:
    """Queue `plots.<plot>(*args, **kwargs)` (numbers and arrays: they are sent to the drawing process); return at once."""
    start()
    assert _drawer is not None
    return _drawer.ask(plot, args, kwargs)


def _serve(requests: IO[bytes], answers: IO[bytes], folder: Path) -> None:
    """The drawing process: draw each figure asked for into its file, answer None or the error, until the input
    ends; then remove `folder`, whose files the run has logged. SIGTERM (the pipeline's exit_now) removes it too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        _draw_each(requests, answers)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _draw_each(requests: IO[bytes], answers: IO[bytes]) -> None:
    from pipeline import plots  # matplotlib: the import this process exists to take off the run's time

    while True:
        try:
            plot, args, kwargs, path = pickle.load(requests)
        except EOFError:
            return
        try:
            plots.save(getattr(plots, plot)(*args, **kwargs), path)
            answer = None
        except Exception as err:  # the run reports it, naming the figure
            answer = f"{type(err).__name__}: {err}"
        pickle.dump(answer, answers)
        answers.flush()


if __name__ == "__main__":
    answers, sys.stdout = sys.stdout.buffer, sys.stderr  # a print while drawing must not corrupt the answers
    _serve(sys.stdin.buffer, answers, Path(sys.argv[1]))
    os._exit(0)  # nothing is left to flush: skipping the interpreter's teardown (0.1 s) spares the run that waits
