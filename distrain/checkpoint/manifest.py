"""The manifest: size and sha256 of every file of a checkpoint, written last, so a checkpoint proves itself whole.

A checkpoint without a manifest never finished; one whose files differ in size was truncated (or grew); one
whose bytes hash differently was corrupted. Any of these is reported in one line and skipped.

Hashing is shared out: at a save every rank hashes the files it wrote, right after writing them (still in the page
cache, and in parallel), and rank 0 writes the manifest from the gathered digests; at a resume every rank verifies
its share of the files. No rank hashes everyone's shards while its peers wait in a collective.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from distrain.checkpoint.paths import DCP_DIR, ENGINE_DIR, MANIFEST, TRAINER_STATE

FORMAT = "distrain-checkpoint/1"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)  # hashlib releases the GIL on large blocks: an async commit does not stall training
    return digest.hexdigest()


def _files(directory: Path) -> List[Tuple[str, Path]]:
    """(relative path, path) of every file under ``directory`` but the manifest, sorted by relative path.

    The kinds come from the directory listing (``os.scandir``'s entry types), not from a stat of every file: each
    rank lists the whole checkpoint to find its own files, and at W ranks it holds 2W+ files (a DCP shard and an
    RNG state per rank), so a stat per file made W x 2W metadata operations per save, job-wide (2 million at
    1,024 ranks, on the shared filesystem's metadata server).
    """
    found: List[Tuple[str, Path]] = []
    pending = [directory]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir():
                    pending.append(Path(entry.path))
                elif entry.is_file() and entry.name != MANIFEST:
                    path = Path(entry.path)
                    found.append((path.relative_to(directory).as_posix(), path))
    return sorted(found)


# Which rank wrote a file, by its name: rng/rank<r>.json, compression/rank<r>.safetensors, DCP's shard files
# __<r>_<n>.distcp, DeepSpeed's zero_pp_rank_<r>_* partitions. Everything else (trainer state, DCP's .metadata,
# engine files of rank 0, consolidated weights) is rank 0's.
_OWNER = (re.compile(r"^rng/rank(\d+)\.json$"), re.compile(r"^compression/rank(\d+)\.safetensors$"),
          re.compile(rf"^{DCP_DIR}/__(\d+)_\d+\.distcp$"), re.compile(rf"^{ENGINE_DIR}/.*zero_pp_rank_(\d+)_"))


def owner_rank(rel: str) -> int:
    """The rank that wrote the checkpoint file ``rel`` (a path relative to the checkpoint directory)."""
    for pattern in _OWNER:
        match = pattern.match(rel)
        if match:
            return int(match.group(1))
    return 0


def share_of(rels: Iterable[str], rank: int, world_size: int) -> List[str]:
    """The files ``rank`` of ``world_size`` hashes: those it wrote (at another world size: by writer rank modulo)."""
    return sorted(rel for rel in rels if owner_rank(rel) % world_size == rank)


def hash_files(directory: Path, rels: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    """{rel: {"size", "sha256"}} of the given files under ``directory``."""
    return {rel: {"size": (directory / rel).stat().st_size, "sha256": sha256_file(directory / rel)} for rel in rels}


def own_digests(directory: Path, rank: int, world_size: int) -> Dict[str, Dict[str, Any]]:
    """Size and sha256 of the files this rank wrote into ``directory`` (call once its writes are done)."""
    return hash_files(directory, share_of((rel for rel, _ in _files(directory)), rank, world_size))


def write_manifest(directory: Path, digests: Optional[Dict[str, Dict[str, Any]]] = None,
                   **fields: Any) -> Dict[str, Any]:
    """Write manifest.json (atomically, fsynced) from every rank's ``digests``; returns the manifest.

    Every file in ``directory`` is listed: a file no rank hashed (all of them when ``digests`` is None) is hashed
    here, and a digest of a file that is not there is an error.
    """
    digests = digests or {}
    present = dict(_files(directory))
    missing = sorted(set(digests) - set(present))
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) hashed by their rank are gone: {', '.join(missing[:5])}")
    files = {**digests, **hash_files(directory, sorted(set(present) - set(digests)))}
    files = {rel: files[rel] for rel in sorted(files)}
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


def structure_problem(directory: Path) -> Tuple[Optional[str], Dict[str, Dict[str, Any]]]:
    """Why ``directory`` is not a complete checkpoint, short of checksums (manifest, files present, sizes); None
    when it is. Returns (problem, the manifest's files)."""
    path = directory / MANIFEST
    if not directory.is_dir():
        return "not a directory", {}
    if not path.is_file():
        return "manifest.json is missing (the save never finished)", {}
    manifest = read_manifest(directory)
    if manifest is None:
        return "manifest.json is unreadable or not a distrain manifest", {}
    if manifest.get("format") != FORMAT:
        return f"manifest format {manifest.get('format')!r} is not {FORMAT!r}", {}
    files: Dict[str, Dict[str, Any]] = manifest["files"]
    if TRAINER_STATE not in files:
        return f"the manifest lists no {TRAINER_STATE}", files
    if not any(rel.startswith((DCP_DIR + "/", ENGINE_DIR + "/")) for rel in files):
        return f"the manifest lists no {DCP_DIR}/ or {ENGINE_DIR}/ files", files
    for rel, expected in files.items():
        target = directory / rel
        if ".." in Path(rel).parts or not target.is_file():
            return f"{rel} is missing", files
        size = target.stat().st_size
        if size != expected.get("size"):
            expected_size = expected.get("size")
            return f"{rel} is {size} bytes but the manifest says {expected_size} (truncated or overwritten)", files
    return None, files


def checksum_problem(directory: Path, files: Dict[str, Dict[str, Any]], rels: Iterable[str]) -> Optional[str]:
    """The first of ``rels`` whose sha256 differs from the manifest's ``files``, in a few words; None when all match."""
    for rel in rels:
        if sha256_file(directory / rel) != files[rel].get("sha256"):
            return f"{rel} fails its sha256 checksum (corrupted)"
    return None


def problem(directory: Path, checksums: bool = True) -> Optional[str]:
    """Why ``directory`` is not a complete, intact checkpoint, in a few words; None when it is.

    ``checksums=False`` checks presence and sizes only (fast, for listings). One process hashes every file here;
    the trainer's resume shares the hashing out over its ranks (``share_of``).
    """
    reason, files = structure_problem(directory)
    if reason is not None or not checksums:
        return reason
    return checksum_problem(directory, files, sorted(files))
