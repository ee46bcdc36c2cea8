"""``pytest --sandbox-cache``: what the cache holds, by kind, with sizes and the
disk budgets that bound it; pytest then exits, as it does after ``--markers``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["cache_report"]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cache_report(cache: Path | None) -> list[str]:
    """The report's lines (reads the cache, changes nothing)."""
    from ..runtime.images import image_budget_bytes
    from ..snapshots import auto_snapshot_budget_bytes, cache_usage

    usage = cache_usage(cache)
    snapshots = auto_snapshot_budget_bytes()
    lines = [
        f"microsandbox cache: {usage.root} ({_size(usage.total)} on disk)",
        f"budgets: root layers {_size(image_budget_bytes())}, templates {_size(snapshots)}, "
        f"zygotes {_size(snapshots)} (least recently used go first; see the README's "
        "'Cache' section)",
        "",
    ]
    width = max(len(k.kind) for k in usage.kinds)
    for kind in usage.kinds:
        lines.append(
            f"  {kind.kind:<{width}}  {kind.count:>4}  {_size(kind.bytes):>10}  {kind.note}"
        )
    if usage.projects:
        sizes = sorted(usage.projects.values())
        lines += [
            "",
            f"per project (its own layers, zygotes and templates): {len(sizes)} projects, "
            f"median {_size(sizes[len(sizes) // 2])}, largest {_size(sizes[-1])}",
        ]
    return lines
