"""`distrain data prepare`: text files, directories or the standard library's source -> token shards.

Every file is one document (followed by the tokenizer's end-of-document id, when it has one), read in chunks cut
at newlines so no file is ever held whole. The tail ``eval_fraction`` of the input bytes (cut at a newline) goes to
the eval split, the rest to train. Tokenizers: ``bytes`` (UTF-8 bytes as ids 0..255, 256 = end of document) or a
Hugging Face ``tokenizers`` JSON file (copied beside the shards).

Everything is written into a temporary directory beside ``out`` and renamed to ``out`` at the end
(``distrain.data.staging``): an interrupted or killed prepare leaves no ``out``, and ``out`` must not exist yet (an
empty directory is accepted).
"""

from __future__ import annotations

import shutil
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from distrain.data.shard_writer import ShardWriter
from distrain.errors import UsageError

CHUNK_BYTES = 8 << 20
STDLIB = "stdlib"  # the SRC that means this Python's standard-library source (the `text` dataset's corpus)
EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; 256 ends a document."""

    vocab_size = 257
    eot: Optional[int] = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def describe(self) -> Dict[str, Any]:
        return {"kind": "bytes", "eot": self.eot}

    def name(self) -> str:
        return "byte-level"


class HFTokenizer:
    """A Hugging Face ``tokenizers`` JSON file (what ``Tokenizer.save`` and ``tokenizer.json`` of a model hold)."""

    def __init__(self, path: Path, eot: Optional[str] = None):
        try:
            from tokenizers import Tokenizer  # lazy: optional: tokenizers is optional (distrain[data])
        except ImportError:
            raise UsageError("--tokenizer FILE needs the Hugging Face tokenizers package: "
                             "pip install 'distrain[data]'.") from None
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side reports parse errors as plain Exceptions
            raise UsageError(f"--tokenizer {path} is not a Hugging Face tokenizers file: {err}.") from None
        self.path = Path(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eot_token = eot
        if eot is not None:
            self.eot = self.tok.token_to_id(eot)
            if self.eot is None:
                raise UsageError(f"--eot {eot!r} is not a token of {path}.")
        else:
            found = [(t, self.tok.token_to_id(t)) for t in EOT_CANDIDATES if self.tok.token_to_id(t) is not None]
            self.eot_token, self.eot = found[0] if found else (None, None)

    def encode(self, data: bytes) -> np.ndarray:
        lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
        encodings = self.tok.encode_batch(lines, add_special_tokens=False)
        return np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64)

    def describe(self) -> Dict[str, Any]:
        return {"kind": "tokenizers", "file": "tokenizer.json", "eot": self.eot, "eot_token": self.eot_token}

    def name(self) -> str:
        return f"tokenizers file {self.path.name}"


@dataclass
class Summary:
    out: Path
    tokens: Dict[str, int]
    shards: int
    vocab_size: int
    dtype: str
    tokenizer: str
    eot: Optional[int]
    documents: int
    bytes_read: int
    skipped: List[Path] = field(default_factory=list)
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)  # what was cleaned up on the way in

    def describe(self) -> str:
        total = sum(self.tokens.values())
        splits = " + ".join(f"{name} {count:,}" for name, count in self.tokens.items())
        eot = f", end-of-document id {self.eot}" if self.eot is not None else ", no end-of-document token"
        skipped = f"; skipped {len(self.skipped)} binary file(s)" if self.skipped else ""
        rate = total / self.seconds if self.seconds > 0 else 0.0
        return (f"distrain data prepare: {total:,} tokens ({splits}) from {self.documents:,} document(s), "
                f"{self.bytes_read / 2**20:,.1f} MiB of text, in {self.shards} shard(s) of {self.dtype} -> "
                f"{self.out}; vocab {self.vocab_size:,} ({self.tokenizer}{eot}){skipped}; "
                f"{self.seconds:.1f} s ({rate:,.0f} tokens/s).")


def source_files(sources: Sequence[str]) -> Tuple[List[Path], List[Path]]:
    """(text files in order, binary files skipped) of the SRC arguments: files, directories (recursively, sorted),
    or ``stdlib``."""
    files: List[Path] = []
    for src in sources:
        if src == STDLIB:
            files += sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
            continue
        path = Path(src).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        else:
            raise UsageError(f"SRC {src!r} is neither a file nor a directory (nor '{STDLIB}', this Python's "
                             f"standard-library source).")
    text, binary = [], []
    for f in files:
        with open(f, "rb") as fh:
            (binary if b"\0" in fh.read(8192) else text).append(f)
    if not text:
        raise UsageError(f"SRC {' '.join(sources)} holds no text files to tokenize.")
    return text, binary


def _chunks(path: Path) -> Iterator[bytes]:
    """The file in pieces of about CHUNK_BYTES, each ending at a newline (the last at the end of the file)."""
    rest = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_BYTES)
            if not block:
                break
            data = rest + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            rest = data[cut:]
            yield data[:cut]
    if rest:
        yield rest


def prepare(sources: Sequence[str], out: Path, tokenizer: str = "bytes", eval_fraction: float = 0.01,
            shard_tokens: int = 100_000_000, eot: Optional[str] = None, max_bytes: Optional[int] = None,
            progress: Optional[bool] = None) -> Summary:
    """Tokenize ``sources`` into shards in ``out``; ``progress`` None shows a bar on a terminal only."""
    if not 0 <= eval_fraction < 1:
        raise UsageError(f"--eval-fraction {eval_fraction} must be in [0, 1).")
    if max_bytes is not None and max_bytes < 1:
        raise UsageError(f"--max-bytes {max_bytes} must be a positive number of bytes.")
    tok = ByteTokenizer() if tokenizer == "bytes" else HFTokenizer(Path(tokenizer), eot)
    if eot is not None and tokenizer == "bytes":
        raise UsageError("--eot names a token of a --tokenizer FILE; the byte-level tokenizer's is always 256.")
    files, skipped = source_files(sources)
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes) if max_bytes is None else min(sum(sizes), max_bytes)
    cut = total - int(total * eval_fraction)  # byte position where the eval split starts
    writer = ShardWriter(out, tok.vocab_size, tok.describe(), shard_tokens)
    started = time.perf_counter()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=None if progress is None
               else not progress, dynamic_ncols=True)
    try:
        if isinstance(tok, HFTokenizer):
            shutil.copyfile(tok.path, writer.dir / "tokenizer.json")
        position, documents = _tokenize(files, tok, writer, total, cut, bar)
        bar.close()
        index = writer.close()
    except BaseException:  # an error or Ctrl-C: nothing half-written ever appears at out
        bar.close()
        writer.abort()
        raise
    return Summary(out=Path(out), tokens={name: writer.tokens(name) for name in index["splits"]},
                   shards=sum(len(s) for s in index["splits"].values()), vocab_size=tok.vocab_size,
                   dtype=index["dtype"], tokenizer=tok.name(), eot=tok.eot, documents=documents,
                   bytes_read=position, skipped=skipped, seconds=time.perf_counter() - started, notes=writer.notes)


def _tokenize(files: Sequence[Path], tok: Any, writer: ShardWriter, total: int, cut: int, bar: Any
              ) -> Tuple[int, int]:
    """Feed the first ``total`` bytes of ``files`` to ``writer``: train before byte ``cut``, eval after; returns
    (bytes read, documents)."""
    position, documents = 0, 0
    for path in files:
        if position >= total:
            break
        documents += 1
        for chunk in _chunks(path):
            chunk = chunk[:total - position]
            head, tail = _split_at(chunk, cut - position)
            if head:
                writer.add("train", tok.encode(head))
            if tail:
                writer.add("eval", tok.encode(tail))
            position += len(chunk)
            bar.update(len(chunk))
            if position >= total:
                break
        if tok.eot is not None:
            writer.add("train" if position <= cut else "eval", np.array([tok.eot]))
    return position, documents


def _split_at(chunk: bytes, at: int) -> Tuple[bytes, bytes]:
    """(train part, eval part) of a chunk whose eval split starts ``at`` bytes in (cut at the next newline)."""
    if at <= 0:
        return b"", chunk
    if at >= len(chunk):
        return chunk, b""
    newline = chunk.find(b"\n", at)
    split = len(chunk) if newline < 0 else newline + 1
    return chunk[:split], chunk[split:]
