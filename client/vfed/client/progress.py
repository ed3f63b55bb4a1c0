"""How `wait(progress=True)` shows a task's runs finishing, chosen by where the output goes.

A rich progress bar redraws itself with terminal escape codes, which a Jupyter notebook prints as garbage
and a log file keeps as noise. So: in a notebook kernel an ipywidgets bar when ipywidgets is installed,
else plain lines; on a terminal the rich bar; anywhere else (a pipe, a file, CI) plain lines.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Mode = Literal["off", "widget", "lines", "terminal"]


class RunsProgress(Protocol):
    """Told how many of a task's runs finished each time the wait learns the state."""

    def update(self, done: int, total: int) -> None: ...


def in_notebook() -> bool:
    """True inside a Jupyter kernel: ipykernel loaded and the running IPython shell is the kernel's
    (a terminal IPython has ipykernel unloaded or a TerminalInteractiveShell)."""
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    get_ipython = getattr(sys.modules["IPython"], "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def _ipywidgets() -> Any | None:
    try:
        return importlib.import_module("ipywidgets")
    except ImportError:
        return None


def choose_mode(enabled: bool, stream: TextIO) -> Mode:
    """Which display `wait` uses: see the module docstring."""
    if not enabled:
        return "off"
    if in_notebook():
        return "widget" if _ipywidgets() is not None else "lines"
    isatty = getattr(stream, "isatty", None)
    return "terminal" if callable(isatty) and isatty() else "lines"


class _Off:
    def update(self, done: int, total: int) -> None:
        """Progress was not asked for."""


class _Lines:
    """One plain line each time the count of finished runs changes (and once at the start)."""

    def __init__(self, task_id: int, stream: TextIO) -> None:
        self.task_id = task_id
        self.stream = stream
        self.last: tuple[int, int] | None = None

    def update(self, done: int, total: int) -> None:
        if (done, total) != self.last:
            self.last = (done, total)
            print(f"task {self.task_id}: {done} of {total} runs finished", file=self.stream, flush=True)


class _Widget:
    """An ipywidgets bar shown in the cell's output; the kernel sends its changes from any thread."""

    def __init__(self, task_id: int, widgets: Any) -> None:
        self.task_id = task_id
        self.bar = widgets.IntProgress(value=0, min=0, max=1, description=f"task {task_id}")
        self.label = widgets.Label(value="")
        importlib.import_module("IPython.display").display(widgets.HBox([self.bar, self.label]))

    def update(self, done: int, total: int) -> None:
        self.bar.max = max(total, 1)
        self.bar.value = done
        self.label.value = f"{done} of {total} runs finished"


class _Terminal:
    def __init__(self, bar: Progress, tracker: Any) -> None:
        self.bar = bar
        self.tracker = tracker

    def update(self, done: int, total: int) -> None:
        self.bar.update(self.tracker, total=total, completed=done)


@contextmanager
def runs_progress(task_id: int, enabled: bool, stream: TextIO | None = None) -> Iterator[RunsProgress]:
    """The display for one wait on `stream` (standard output when None, read at call time)."""
    out = sys.stdout if stream is None else stream
    mode = choose_mode(enabled, out)
    if mode == "off":
        yield _Off()
    elif mode == "lines":
        yield _Lines(task_id, out)
    elif mode == "widget":
        yield _Widget(task_id, _ipywidgets())
    else:
        with Progress(
            TextColumn(f"task {task_id}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("runs"),
            TimeElapsedColumn(),
            console=Console(file=out),
            transient=False,
        ) as bar:
            yield _Terminal(bar, bar.add_task("runs", total=None))
