"""The guest side of ``@pytest.mark.sandbox``: the test runner started inside the
VM (:mod:`.runner`, started by ``bootstrap.py`` run by its path) and the messages it
exchanges with the host (:mod:`.messages`, which the plugin imports too).

Only the standard library and pytest, never the runtime, the snapshots or the
plugin (``tests/test_layers.py`` checks it): the runner starts under emulation,
where every import costs. The protocol: ``docs/runner-protocol.md``.
"""

from __future__ import annotations

__all__: list[str] = []
