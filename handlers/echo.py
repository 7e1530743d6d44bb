"""The no-op handler: returns each item unchanged (used by the example job and the overhead benchmark)."""

from typing import Any


def handle(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return item
