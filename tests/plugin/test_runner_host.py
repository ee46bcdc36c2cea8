"""The host side of the guest runner without a VM: the guest's pytest arguments,
the watched files, and one request/answer exchange against a fake runner.
"""

from __future__ import annotations

import json

import pytest

from pytest_microsandbox.guest.messages import PREFIX, Done, Report, Request, encode_answer
from pytest_microsandbox.plugin._options import resolve_settings
from pytest_microsandbox.plugin._runner import HostRunner, guest_args, watched_files
from pytest_microsandbox.plugin._stats import Stats

pytest_plugins = ["pytester"]


def test_guest_args_forward_report_shaping_options(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\naddopts = -n 2\n")
    config = pytester.parseconfig(
        "-p", "no:xdist", "-vv", "--tb=short", "-l", "-W", "error::UserWarning",
        "-o", "xfail_strict=true", "--strict-markers", "-o", "addopts=",
        "-o", "sandbox_env=TOKEN=s3cret", "--sandbox-env", "OTHER=s3cret",
    )  # fmt: skip
    args = guest_args(config, ["/x/test_a.py"])
    assert not [a for a in args if "s3cret" in a]  # test variables never reach the zygote
    assert args[:2] == ["-o", "addopts="]  # no -n, --junitxml, ... from addopts in the guest
    for expected in ("-vv", "--tb=short", "-l", "--strict-markers", "--color=no"):
        assert expected in args
    assert args[args.index("-W") + 1] == "error::UserWarning"
    assert "xfail_strict=true" in args
    assert args[-1] == "/x/test_a.py"
    assert args[args.index("--rootdir") + 1] == str(config.rootpath)


def test_watched_files_are_tests_conftests_and_ini(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\n")
    pytester.makeconftest("")
    sub = pytester.mkpydir("sub")
    (sub / "conftest.py").write_text("")
    test = sub / "test_a.py"
    test.write_text("def test(): pass\n")
    config = pytester.parseconfig()
    watched = {p.name for p in watched_files(config, [str(test)])}
    assert watched == {"test_a.py", "conftest.py", "tox.ini"}
    assert len(watched_files(config, [str(test)])) == 4  # two conftests


class _StubSandbox:
    """What HostRunner.exchange uses of a Sandbox, without a VM."""

    name = "stub"

    async def _watched(self, what, call):
        return await call()

    def console_tail(self, lines=40):
        return "console tail"


def _exchange(pytester: pytest.Pytester, answer, timeout=None, earlier=None):
    """Run one exchange against a fake runner: ``answer(request, send)`` plays the
    guest, ``request`` being the :class:`Request` the host sent.
    """
    import anyio
    from anyio.streams.stapled import StapledObjectStream

    config = pytester.parseconfigure()
    runner = HostRunner(config, resolve_settings(config), Stats())

    async def main():
        to_guest_send, to_guest_recv = anyio.create_memory_object_stream(10)
        to_host_send, to_host_recv = anyio.create_memory_object_stream(10)
        host_side = StapledObjectStream(to_guest_send, to_host_recv)  # bytes both ways
        async with anyio.create_task_group() as tg:

            async def guest():
                request = Request.decode((await to_guest_recv.receive()).rstrip(b"\n"))
                await answer(request, to_host_send)

            tg.start_soon(guest)
            outcome = await runner.exchange(
                _StubSandbox(), host_side, "t.py::x", True, timeout, {"A": "1"}, earlier
            )
            tg.cancel_scope.cancel()
        return outcome

    return anyio.run(main)


def _line(seq, kind, data):
    """An answer line as a (possibly hostile) guest writes it."""
    return (PREFIX + json.dumps({"seq": seq, "kind": kind, "data": data}) + "\n").encode()


def _report(when, outcome="passed", nodeid="t.py::x"):
    return {"$report_type": "TestReport", "nodeid": nodeid, "when": when, "outcome": outcome}


async def _whole_answer(request, send):
    """What the runner answers for a passing test (encoded as the runner encodes it)."""
    for when in ("setup", "call", "teardown"):
        await send.send(
            encode_answer(request.seq, Report("t.py::x", when, "passed", _report(when)))
        )
    await send.send(encode_answer(request.seq, Done(status=0)))


def test_exchange_sends_a_fresh_random_seq_and_the_test_env(pytester: pytest.Pytester):
    requests = []

    async def answer(request, send):
        requests.append(request)
        await _whole_answer(request, send)

    earlier: dict[str, str] = {}
    for _ in range(2):
        outcome = _exchange(pytester, answer, earlier=earlier)
        assert outcome.error is None and outcome.violation is None
        assert [m.when for m in outcome.messages[:3]] == ["setup", "call", "teardown"]
    seqs = [r.seq for r in requests]
    assert len(set(seqs)) == 2 and all(len(s) == 32 for s in seqs)
    assert requests[0].env == {"A": "1"} and requests[0].fork is True
    assert requests[0].nodeid == "t.py::x"
    assert earlier == {seqs[0]: "t.py::x", seqs[1]: "t.py::x"}


def test_exchange_rejects_a_late_line_of_an_earlier_request(pytester: pytest.Pytester):
    async def answer(request, send):
        await send.send(_line("old", "done", {"status": None, "signal": 9}))
        await _whole_answer(request, send)

    outcome = _exchange(pytester, answer, earlier={"old": "t.py::before"})
    assert outcome.violation is not None
    assert "a line of the earlier test t.py::before after its end" in outcome.violation


@pytest.mark.parametrize(
    ("forged", "seen"),
    [
        (
            _report("call", nodeid="t.py::other"),
            "a report for another test, 't.py::other', while t.py::x ran",
        ),
        (_report("setup"), "a second 'setup' report for t.py::x"),
    ],
)
def test_exchange_rejects_forged_reports(pytester: pytest.Pytester, forged, seen):
    async def answer(request, send):
        seq = request.seq
        await send.send(_line(seq, "report", _report("setup")))
        await send.send(_line(seq, "report", forged))
        await _whole_answer(request, send)

    outcome = _exchange(pytester, answer)
    assert outcome.violation == (
        f"protocol violation: the guest sent {seen}: results from inside the guest cannot be "
        "trusted"
    )


def test_exchange_fails_a_flooding_guest_at_the_cap(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MICROSANDBOX_REPORT_MAX_MB", "0.01")  # 10 KiB

    async def answer(request, send):
        for _ in range(100):
            await send.send(b"x" * 1000)  # no newline: one endless line

    outcome = _exchange(pytester, answer)
    assert outcome.violation is not None
    assert "more than 10485 bytes for t.py::x" in outcome.violation


def test_exchange_reports_a_closed_channel_as_a_crash(pytester: pytest.Pytester):
    async def answer(request, send):
        await send.send(_line(request.seq, "report", _report("setup")))
        await send.aclose()

    outcome = _exchange(pytester, answer)
    assert outcome.error is not None and outcome.error.startswith("the guest crashed")
    assert outcome.console == "console tail"
    assert [m.when for m in outcome.messages] == ["setup"]  # what arrived is kept


def test_exchange_reports_the_runners_done_for_a_dead_test_process(pytester: pytest.Pytester):
    async def answer(request, send):
        await send.send(_line(request.seq, "report", _report("setup")))
        await send.send(_line(request.seq, "done", {"status": None, "exit": 0}))

    outcome = _exchange(pytester, answer)
    assert outcome.error == "the test process in the guest exited with status 0 before it finished"


def test_exchange_times_out(pytester: pytest.Pytester):
    import anyio

    async def answer(request, send):
        await anyio.sleep(30)

    outcome = _exchange(pytester, answer, timeout=0.2)
    assert outcome.error == "the test ran past its 0.2 s timeout in the guest"


def test_a_used_vm_clone_is_killed_in_the_background_and_awaited_at_close():
    import anyio

    from pytest_microsandbox.plugin._runner import _discard
    from pytest_microsandbox.runtime import Sandbox, SandboxConfig
    from pytest_microsandbox.runtime.hostproc import HostProcessBackend

    async def body() -> None:
        sandbox = await Sandbox.create(SandboxConfig(name="used"), backend=HostProcessBackend())
        pending: set[anyio.Event] = set()
        await _discard(sandbox, pending)
        assert len(pending) == 1  # the kill runs on, the caller did not wait for it
        for done in list(pending):
            with anyio.fail_after(30):
                await done.wait()
        assert pending == set()
        assert not sandbox.running

    anyio.run(body)
