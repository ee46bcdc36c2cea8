"""``@pytest.mark.sandbox``: the whole test (fixtures, body, asserts) runs in the guest.

Same Python, same venv, same files as on the host, but as root in a throwaway
VM: the test may rewrite /etc or delete system files, and the next test (and
the host) never sees it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.sandbox(memory=512, network="none", timeout=60)  # denies all


@pytest.fixture
def hosts_entry() -> str:
    # Fixtures run in the guest too.
    return "10.0.0.9 db.internal\n"


def test_runs_as_root_and_changes_etc(hosts_entry):
    assert os.getuid() == 0
    with open("/etc/hosts", "a") as f:
        f.write(hosts_entry)
    assert Path("/etc/hosts").read_text().endswith(hosts_entry)


def test_deletes_system_files():
    Path("/etc/passwd").unlink()
    assert not Path("/etc/passwd").exists()


def test_earlier_changes_are_gone():
    # Each test starts from the same pristine guest, whatever ran before.
    assert Path("/etc/passwd").exists()
    assert "db.internal" not in Path("/etc/hosts").read_text()


def test_cannot_reach_the_network():
    with pytest.raises(OSError):
        socket.create_connection(("1.1.1.1", 53), timeout=2)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_parametrize_and_tmp_path(n, tmp_path):
    (tmp_path / "out.txt").write_text(str(n * n))
    assert (tmp_path / "out.txt").read_text() == str(n * n)
