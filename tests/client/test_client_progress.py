"""`wait(progress=True)` draws no terminal escape codes where they would be garbage: plain lines when
standard output is not a terminal, plain lines or an ipywidgets bar in a Jupyter kernel, the rich bar on a
terminal; `vfed task wait` draws on stderr, keeping stdout for its outcome line. The waits run against the
real server app (SQLite) with a task no node runs.

Faked, because neither Jupyter nor ipywidgets is installed here: the notebook kernel (modules named
`ipykernel` and `IPython` whose `get_ipython()` is a `ZMQInteractiveShell`), `IPython.display.display`, and
ipywidgets' IntProgress/Label/HBox (objects with the attributes the client sets). A terminal is a text
stream whose isatty() is true, which is all rich asks of one."""

from __future__ import annotations

import asyncio
import io
import os
import pty
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from tests.client.test_client_async_wait import _unfinishable_task
from tests.node.node_harness import PASSWORD, Server

from vfed.client import AsyncClient, TaskTimeout
from vfed.client.progress import choose_mode, in_notebook, runs_progress

ESC = "\x1b"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Widget:
    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


def fake_kernel(monkeypatch: pytest.MonkeyPatch, shell: str = "ZMQInteractiveShell") -> list[Any]:
    """Installs a fake kernel; returns the list of what it was asked to display."""
    shown: list[Any] = []
    shell_class = type(shell, (), {})
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = shell_class  # type: ignore[attr-defined]
    display = types.ModuleType("IPython.display")
    display.display = shown.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    return shown


def fake_ipywidgets(monkeypatch: pytest.MonkeyPatch) -> None:
    widgets = types.ModuleType("ipywidgets")
    widgets.IntProgress = Widget  # type: ignore[attr-defined]
    widgets.Label = Widget  # type: ignore[attr-defined]
    widgets.HBox = lambda children: Widget(children=children)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ipywidgets", widgets)


def no_ipywidgets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # makes `import ipywidgets` raise ImportError


def test_a_terminal_gets_the_rich_bar() -> None:
    out = Tty()
    assert not in_notebook() and choose_mode(True, out) == "terminal"
    with runs_progress(7, True, out) as shown:
        shown.update(1, 2)
    text = out.getvalue()
    assert ESC in text and "task 7" in text and "1/2" in text, text
    assert choose_mode(False, out) == "off"


def test_a_pipe_gets_plain_lines_once_per_change() -> None:
    out = io.StringIO()
    with runs_progress(7, True, out) as shown:
        for done, total in [(0, 2), (0, 2), (1, 2), (2, 2)]:
            shown.update(done, total)
    assert out.getvalue().splitlines() == [
        "task 7: 0 of 2 runs finished",
        "task 7: 1 of 2 runs finished",
        "task 7: 2 of 2 runs finished",
    ]
    off = io.StringIO()
    with runs_progress(7, False, off) as shown:
        shown.update(1, 2)
    assert off.getvalue() == ""


def test_a_notebook_without_ipywidgets_gets_plain_lines_even_on_a_tty_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shown = fake_kernel(monkeypatch)
    no_ipywidgets(monkeypatch)
    out = Tty()
    assert in_notebook() and choose_mode(True, out) == "lines"
    with runs_progress(3, True, out) as bar:
        bar.update(1, 4)
    assert out.getvalue() == "task 3: 1 of 4 runs finished\n" and shown == []


def test_a_notebook_with_ipywidgets_gets_a_widget(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = fake_kernel(monkeypatch)
    fake_ipywidgets(monkeypatch)
    out = io.StringIO()
    assert choose_mode(True, out) == "widget"
    with runs_progress(3, True, out) as bar:
        bar.update(0, 0)
        bar.update(2, 4)
    [box] = shown
    progress, label = box.children
    assert (progress.value, progress.max, progress.description) == (2, 4, "task 3")
    assert label.value == "2 of 4 runs finished" and out.getvalue() == ""


def test_terminal_ipython_is_not_a_notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_kernel(monkeypatch, shell="TerminalInteractiveShell")
    assert not in_notebook() and choose_mode(True, Tty()) == "terminal"


async def test_wait_prints_plain_lines_when_stdout_is_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = Server(tmp_path / "server", mqtt_url=None)
    await server.seed(["north", "south"], collaboration="study")
    await server.start()
    try:
        task_id = await _unfinishable_task(server)
        async with AsyncClient(server.url) as researcher:
            await researcher.login("res-north", PASSWORD)
            with pytest.raises(TaskTimeout):
                await researcher.wait(task_id, timeout_s=1.0, progress=True)
    finally:
        await server.stop()
    out = capsys.readouterr().out
    assert out == f"task {task_id}: 0 of 1 runs finished\n", out


def _wait_with_stderr_on_a_tty(task_id: int) -> tuple[int, str, str]:
    """`vfed task wait --timeout 1` with stderr on a pseudo-terminal and stdout piped: exit code, stdout,
    what reached the terminal."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vfed.client.cli", "task", "wait", str(task_id), "--timeout", "1"],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
        )
        os.close(slave)
        out, _ = proc.communicate(timeout=120)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal and everything it wrote was read
                break
            if not chunk:
                break
            seen += chunk
        return proc.returncode, out, seen.decode(errors="replace")
    finally:
        os.close(master)


async def test_cli_wait_draws_its_bar_on_stderr_not_stdout(tmp_path: Path) -> None:
    server = Server(tmp_path / "server", mqtt_url=None)
    await server.seed(["north", "south"], collaboration="study")
    await server.start()
    try:
        task_id = await _unfinishable_task(server)
        cli = [sys.executable, "-m", "vfed.client.cli"]
        login = await asyncio.to_thread(
            subprocess.run,
            [*cli, "login", "--url", server.url, "--username", "res-north", "--password", PASSWORD],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert login.returncode == 0, login.stderr
        code, out, terminal = await asyncio.to_thread(_wait_with_stderr_on_a_tty, task_id)
    finally:
        await server.stop()
    assert code == 1 and out == "", (code, out, terminal)
    assert ESC in terminal and f"task {task_id}" in terminal and "0/1" in terminal, terminal
