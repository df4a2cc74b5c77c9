"""A proxy that counts the attribute reads made through it: a store's requests, a config's key reads."""

from typing import Any


class CountingReads:
    """``obj`` as it is, with ``reads``: how many attributes were read through this proxy."""

    def __init__(self, obj: Any):
        self.obj, self.reads = obj, 0

    def __getattr__(self, name: str) -> Any:
        self.reads += 1
        return getattr(self.obj, name)
