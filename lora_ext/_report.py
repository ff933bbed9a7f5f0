"""The one format of lora_ext's "nothing was changed, here is everything wrong" errors."""
from __future__ import annotations

from typing import Iterable, Sequence


def problem_report(groups: Sequence[tuple[str, Iterable[str]]], limit: int = 20) -> str:
    """One indented block per non-empty group: its title, its count, then up to `limit` items.

    Returns "" when every group is empty, so callers raise only when the report says something.
    """
    blocks = []
    for title, items in groups:
        items = list(items)
        if not items:
            continue
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        blocks.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more)
    return "\n".join(blocks)
