"""`distrain verify`: run one config at several world sizes and prove the final parameters agree."""

from distrain.verify.compare import (Comparison, WorldResult, compare, format_table, parse_worlds, read_world, run_world,
                                     verify)

__all__ = ["Comparison", "WorldResult", "compare", "format_table", "parse_worlds", "read_world", "run_world", "verify"]
