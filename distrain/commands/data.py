"""`distrain data prepare SRC... --out DIR`: text files, directories or the stdlib's source -> token shards;
`distrain data verify DIR`: every shard checked against its checksum."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distrain.commands import needs_action


def register(sub) -> None:
    from distrain.cli import Parser  # lazy: start-up: the CLI parser loads every command, the work loads on use

    p = sub.add_parser("data", help="prepare data: tokenize text into memory-mapped token shards")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser)
    prep = actions.add_parser("prepare", help="tokenize text files, directories or 'stdlib' into token shards "
                                              "(data.name=tokens reads them)")
    prep.add_argument("sources", nargs="+", metavar="SRC",
                      help="a text file, a directory (every text file in it, recursively, sorted), or 'stdlib' "
                           "(this Python's standard-library source)")
    prep.add_argument("--out", required=True, type=Path, metavar="DIR",
                      help="a new directory for the shards (it must not exist, or be empty); written under a "
                           "temporary name beside it and renamed when complete")
    prep.add_argument("--tokenizer", default="bytes", metavar="bytes|FILE",
                      help="'bytes' (UTF-8 bytes, vocab 257 with an end-of-document id) or a Hugging Face "
                           "tokenizers JSON file (default: bytes)")
    prep.add_argument("--eot", default=None, metavar="TOKEN",
                      help="the end-of-document token of --tokenizer FILE (default: <|endoftext|>, </s>, <eos>, "
                           "... whichever it has)")
    prep.add_argument("--eval-fraction", type=float, default=0.01, metavar="F",
                      help="share of the input (its tail) written to the eval split (default 0.01)")
    prep.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                      help="tokens per shard file (default 100,000,000)")
    prep.add_argument("--max-bytes", type=int, default=None, metavar="N", help="read at most N bytes of input")
    prep.set_defaults(handler=run_prepare)
    check = actions.add_parser("verify", help="read every token shard of DIR in full and check it against the "
                                              "sha256 in its index (exit 0: intact, 1: a corrupt shard)")
    check.add_argument("directory", type=Path, metavar="DIR", help="a directory of token shards (with index.json)")
    check.set_defaults(handler=run_verify)
    p.set_defaults(handler=needs_action("distrain data: choose an action: `prepare SRC... --out DIR` or "
                                        "`verify DIR`."))


def run_prepare(args: argparse.Namespace) -> int:
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.data.prepare import prepare

    summary = prepare(args.sources, args.out, tokenizer=args.tokenizer, eval_fraction=args.eval_fraction,
                      shard_tokens=args.shard_tokens, eot=args.eot, max_bytes=args.max_bytes)
    for note in summary.notes:
        print(f"distrain data prepare: note: {note}", file=sys.stderr)
    print(summary.describe())
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from distrain.data.shard_check import verify_shards  # lazy, as every command: `distrain --help` stays fast

    print(verify_shards(args.directory).describe())
    return 0
