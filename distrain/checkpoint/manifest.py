"""The manifest: size and sha256 of every file of a checkpoint, written last, so a checkpoint proves itself whole.

A checkpoint without a manifest never finished; one whose files differ in size was truncated (or grew); one
whose bytes hash differently was corrupted. Any of these is reported in one line and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

from distrain.checkpoint.layout import DCP_DIR, ENGINE_DIR, MANIFEST, TRAINER_STATE

FORMAT = "distrain-checkpoint/1"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)  # hashlib releases the GIL on large blocks: an async commit does not stall training
    return digest.hexdigest()


def _files(directory: Path):
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path.relative_to(directory).as_posix(), path


def write_manifest(directory: Path, **fields: Any) -> Dict[str, Any]:
    """Hash every file under ``directory`` and write manifest.json (atomically, fsynced); returns the manifest."""
    files = {rel: {"size": path.stat().st_size, "sha256": sha256_file(path)} for rel, path in _files(directory)}
    manifest = {"format": FORMAT, "created": time.time(), **fields, "total_bytes": sum(f["size"] for f in files.values()),
                "files": files}
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    return manifest


def read_manifest(directory: Path) -> Optional[Dict[str, Any]]:
    """The parsed manifest, or None when it is missing or unreadable (``problem`` says which)."""
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def problem(directory: Path, checksums: bool = True) -> Optional[str]:
    """Why ``directory`` is not a complete, intact checkpoint, in a few words; None when it is.

    ``checksums=False`` checks presence and sizes only (fast, for listings); a resume always hashes.
    """
    path = directory / MANIFEST
    if not directory.is_dir():
        return "not a directory"
    if not path.is_file():
        return "manifest.json is missing (the save never finished)"
    manifest = read_manifest(directory)
    if manifest is None:
        return "manifest.json is unreadable or not a distrain manifest"
    if manifest.get("format") != FORMAT:
        return f"manifest format {manifest.get('format')!r} is not {FORMAT!r}"
    files: Dict[str, Dict[str, Any]] = manifest["files"]
    if TRAINER_STATE not in files:
        return f"the manifest lists no {TRAINER_STATE}"
    if not any(rel.startswith((DCP_DIR + "/", ENGINE_DIR + "/")) for rel in files):
        return f"the manifest lists no {DCP_DIR}/ or {ENGINE_DIR}/ files"
    for rel, expected in files.items():
        target = directory / rel
        if ".." in Path(rel).parts or not target.is_file():
            return f"{rel} is missing"
        size = target.stat().st_size
        if size != expected.get("size"):
            return f"{rel} is {size} bytes but the manifest says {expected.get('size')} (truncated or overwritten)"
    if checksums:
        for rel, expected in files.items():
            if sha256_file(directory / rel) != expected.get("sha256"):
                return f"{rel} fails its sha256 checksum (corrupted)"
    return None
