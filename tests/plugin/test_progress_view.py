"""How the plugin shows build progress (plugin/_progress.py), on a fake terminal."""

from __future__ import annotations

import time

from pytest_microsandbox.plugin._progress import ProgressView
from pytest_microsandbox.runtime.progress import BuildEvent


class FakeTerminal:
    """What ProgressView uses of pytest's TerminalReporter, recorded."""

    class _TW:
        fullwidth = 60

    def __init__(self) -> None:
        self._tw = self._TW()
        self.lines: list[str] = []
        self.rewrites: list[str] = []

    def write_line(self, line: str) -> None:
        self.lines.append(line)

    def rewrite(self, line: str, erase: bool = False) -> None:
        self.rewrites.append(line)

    def ensure_newline(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def write_raw(self, content: str, flush: bool = False) -> None:
        pass


def ev(id: int, state: str, kind: str = "zygote", parent: int = 0, **kw) -> BuildEvent:
    return BuildEvent(id=id, kind=kind, what=f"{kind} {id}", state=state, parent=parent,
                      **kw)  # type: ignore[arg-type]  # fmt: skip


def test_a_log_gets_one_line_per_stage_as_it_starts():
    terminal = FakeTerminal()
    view = ProgressView(terminal, live=False)
    for event in (ev(1, "start"), ev(2, "start", "template", parent=1),
                  ev(2, "step", "template", parent=1, step="booting"),
                  ev(2, "done", "template", parent=1), ev(3, "start", "layer", parent=1),
                  ev(3, "failed", "layer", parent=1, elapsed=2.0), ev(1, "done")):  # fmt: skip
        view(event)
    assert terminal.lines == [
        "microsandbox: building zygote 1 ...",
        "microsandbox: building template 2 ...",
        "microsandbox: building layer 3 ...",
        "microsandbox: building layer 3 failed after 2.0 s",
    ]
    assert terminal.rewrites == []


def test_a_terminal_gets_a_live_line_and_one_line_per_finished_stage():
    terminal = FakeTerminal()
    view = ProgressView(terminal, live=True)
    view(ev(1, "start"))
    view(ev(2, "start", "template", parent=1))
    view(ev(2, "step", "template", parent=1, step="booting the VM"))
    assert (
        terminal.rewrites[-1]
        == ("microsandbox: building zygote 0s > template 0s: template 2 (booting the VM)"[:59])
    )
    view(ev(2, "done", "template", parent=1))  # nested: only the live line shows it
    assert terminal.lines == []
    view(ev(1, "done", elapsed=31.25, size=3 << 20))
    assert terminal.lines == ["microsandbox: built zygote 1 in 31.2 s, 3.0 MiB"]
    assert terminal.rewrites[-1] == ""  # the live line is erased
    view.close()


def test_the_live_line_ticks_while_nothing_happens():
    terminal = FakeTerminal()
    view = ProgressView(terminal, live=True)
    view(ev(1, "start"))
    before = len(terminal.rewrites)
    time.sleep(1.2)
    assert len(terminal.rewrites) > before  # the elapsed seconds move on
    view.close()
    assert terminal.rewrites[-1] == ""


def test_a_log_line_after_progress_dots_starts_a_line_of_its_own():
    """xdist writes its dots without the reporter knowing the line is open."""
    import io

    from _pytest._io import TerminalWriter

    out = io.StringIO()
    writer = TerminalWriter(out)

    class Terminal(FakeTerminal):
        def write_line(self, line: str) -> None:
            writer.line(line)

    terminal = Terminal()
    terminal._tw = writer  # type: ignore[assignment]
    writer.write("....")
    ProgressView(terminal, live=False)(ev(1, "start"))
    assert out.getvalue().splitlines() == ["....", "microsandbox: building zygote 1 ..."]
