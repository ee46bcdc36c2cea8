"""The default runtime of an event loop (runtime/lifetime.py): no VM."""

from __future__ import annotations

import anyio

from pytest_microsandbox.runtime.lifetime import Runtime, current_runtime


def test_tasks_asking_at_once_get_the_same_entered_runtime() -> None:
    # The plugin's prefill and a test's first create ask on the same loop at
    # about the same time: the second must not get a runtime still being
    # started (it refused work: "the runtime is closed").
    got: list[Runtime] = []
    ran: list[int] = []

    async def ask(i: int) -> None:
        runtime = await current_runtime()
        got.append(runtime)

        async def work() -> None:
            ran.append(i)

        runtime.spawn(work)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(ask, i)
        await anyio.sleep(0.01)

    anyio.run(main)
    assert len(got) == 3 and got[0] is got[1] is got[2]
    assert sorted(ran) == [0, 1, 2]
