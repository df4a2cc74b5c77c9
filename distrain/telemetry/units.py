"""The one byte formatter and the one duration formatter, so every table and log line reads the same."""

from __future__ import annotations

from typing import Optional


def format_bytes(n: float, digits: int = 1) -> str:
    """1536 -> '1.5 KiB' (binary units up to TiB; whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: Optional[float]) -> str:
    """3725.4 -> '1:02:05' (H:MM:SS, rounded to the second); None -> '-'."""
    if seconds is None:
        return "-"
    whole = int(round(max(0.0, seconds)))
    return f"{whole // 3600:d}:{whole // 60 % 60:02d}:{whole % 60:02d}"
