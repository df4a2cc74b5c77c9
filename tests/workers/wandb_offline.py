"""Read a W&B offline run back: the history rows of its ``run-<id>.wandb`` file.

wandb 0.31 has no public reader for offline runs (`wandb sync` only uploads them; the Python datastore reader
of older releases is gone), so this follows the file's documented layout: a 7-byte header (``:W&B``, magic,
version), then LevelDB's log format (32 KiB blocks of records: crc32 uint32, length uint16, type uint8 = FULL,
FIRST, MIDDLE, LAST; a block tail shorter than a record header is padding), each record a serialized
``wandb.proto.wandb_internal_pb2.Record``. History rows are the records whose type is ``history``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Dict, Iterator, List

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log (header {data[:7]!r})"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer: padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad checksum at {pos} in {path}"
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def history(path: Path) -> List[Dict[str, object]]:
    """The run's logged rows in order, without W&B's own bookkeeping keys (_step, _runtime, _timestamp)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in _payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def run_id(path: Path) -> str:
    """The run id this offline file belongs to (from its ``run`` record)."""
    from wandb.proto import wandb_internal_pb2

    for raw in _payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise AssertionError(f"no run record in {path}")
