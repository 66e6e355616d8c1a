"""The drawing process (pipeline/drawing.py): real PNG files from a real process, errors that name the figure,
and a process that never outlives the one that started it. Each test runs in a fresh interpreter, since the
drawing process serves one interpreter for its whole life."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_figures_are_drawn_by_another_process_into_png_files_in_the_order_asked() -> None:
    done = run_python("""
        import json, sys
        import numpy as np
        from pipeline import drawing
        drawing.start()
        y = np.array([0, 1, 1, 0])
        figures = [
            drawing.draw("learning_curves", {"train_loss": [(1, 0.9), (2, 0.5)], "val_loss": [(1, 1.0), (2, 0.7)]}, "val_loss"),
            drawing.draw("confusion_matrix", y, np.array([0, 1, 0, 0]), ("a", "b")),
            drawing.draw("metric_against", [0.1, 0.01], [0.5, 0.7], "optim.lr", "val_accuracy", log_x=True),
        ]
        pngs = [figure.png() for figure in figures]
        print(json.dumps({"heads": [p.read_bytes()[:8].hex() for p in pngs], "names": [p.name for p in pngs],
                          "matplotlib_here": "matplotlib" in sys.modules}))
    """)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["heads"] == [PNG_SIGNATURE.hex()] * 3
    assert shown["names"] == ["0-learning_curves.png", "1-confusion_matrix.png", "2-metric_against.png"]
    assert shown["matplotlib_here"] is False  # the import this process is spared


def test_a_figure_that_fails_names_itself_and_its_error_and_the_next_one_is_still_drawn() -> None:
    done = run_python("""
        import json
        import numpy as np
        from pipeline import drawing
        broken = drawing.draw("prediction_vs_target", np.array([]), np.array([]))  # no samples: min() of nothing
        unknown = drawing.draw("pie_chart", [1, 2])
        fine = drawing.draw("prediction_vs_target", np.array([1.0, 2.0]), np.array([1.1, 1.9]))
        errors = []
        for figure in (broken, unknown):
            try:
                figure.png()
            except drawing.DrawingError as err:
                errors.append(str(err))
        print(json.dumps({"errors": errors, "fine": fine.png().stat().st_size}))
    """)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert len(shown["errors"]) == 2
    assert "'prediction_vs_target' could not be drawn: ValueError" in shown["errors"][0]
    assert "'pie_chart' could not be drawn: AttributeError" in shown["errors"][1]
    assert shown["fine"] > 1000


def test_a_drawing_process_that_died_is_said_plainly_and_the_next_figure_starts_a_new_one() -> None:
    done = run_python("""
        import json
        from pipeline import drawing
        lost = drawing.draw("learning_curves", {}, "val_loss")  # the process is still importing matplotlib: not drawn yet
        first = drawing._drawer
        first.process.kill()
        first.process.wait()
        try:
            lost.png()
            error = None
        except drawing.DrawingError as err:
            error = str(err)
        again = drawing.draw("learning_curves", {"train_loss": [(1, 0.5)]}, "val_loss")
        print(json.dumps({"error": error, "again": again.png().exists(), "new": drawing._drawer is not first}))
    """)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert "'learning_curves' could not be drawn: the drawing process ended (exit code -9" in shown["error"]
    assert shown["again"] and shown["new"]


def test_the_drawing_process_is_out_of_the_terminals_reach_and_ends_with_the_process_that_started_it() -> None:
    """Ctrl-C in a terminal signals the foreground process group: the drawing process is not in it (the
    pipeline's own exit ends it). Killed with SIGKILL, the pipeline cannot end it: its input closes, and it exits."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "from pipeline import drawing; import sys, time; drawing.start(); "
         "print(drawing._drawer.process.pid, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        drawer = psutil.Process(int(parent.stdout.readline()))
        assert os.getpgid(drawer.pid) != os.getpgid(parent.pid)
        time.sleep(2)  # importing matplotlib: it must end all the same
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        drawer.wait(timeout=30)  # psutil.TimeoutExpired if it outlived its parent
    finally:
        parent.kill()
