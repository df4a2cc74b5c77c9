"""Parse SLURM compressed hostlists (``SLURM_JOB_NODELIST`` and friends).

SLURM hands a job its nodes as a *compressed* hostlist such as
``node[01-04,07],gpu-a[1-2]``.  To pick a rendezvous master every rank must
agree on the first host, so we need the same expansion SLURM itself uses:

* ``node[01-04,07]`` -> ``node01 node02 node03 node04 node07``
  (zero padding: the width of a range is the width of its low bound, as in
  SLURM's ``hostlist.c``);
* several bracket groups in one name form a cartesian product, in the order
  SLURM's ``hostlist.c`` produces (it recurses from the *last* group
  leftwards, see :func:`_slurm_nesting`): ``rack[1-2]-n[01-02]`` gives
  ``rack1-n01 rack1-n02 rack2-n01 rack2-n02``, and ``a[1-2]b[1-2]c[1-2]``
  gives ``a1b1c1 a1b1c2 a2b1c1 a2b1c2 a1b2c1 ...`` (not plain
  lexicographic order) - exactly what ``scontrol show hostnames`` prints;
* text after the last group (``n[1-2].cluster``) is accepted and copied to
  every host, as python-hostlist does; slurm 22.05 itself rejects it, and it
  never appears in a list SLURM generates;
* top-level commas (and whitespace) separate hosts; commas inside brackets
  separate ranges;
* duplicates and order are kept exactly as written (SLURM does not sort or
  dedupe here either), and empty items (``a,,b``) are skipped like SLURM does.

Where SLURM is sloppier than this parser we raise instead: a stray ``]`` or an
unclosed ``[`` (SLURM turns ``a[1-2`` into the host ``a]``) and an open range
``a[1-]`` (SLURM reads ``a1``) are almost certainly typos.

:func:`expand_hostlist` is pure Python so it works on login nodes, in
containers and in tests without SLURM installed.  :func:`first_host` prefers
the real ``scontrol`` when it is available, since it is the authority on any
syntax corner we do not model.

This module deliberately imports nothing from ``distrain``.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess

__all__ = ["expand_hostlist", "first_host", "MAX_HOSTS"]

# Guard against typos such as ``node[1-1000000000]`` exhausting memory.
# SLURM's own limit (MAX_RANGE) is 64Ki hosts per range; we cap the total.
MAX_HOSTS = 65536

# Seconds to wait for ``scontrol`` before falling back to the pure parser; a
# hung slurmctld must not hang the training launcher.
_SCONTROL_TIMEOUT_S = 5.0

_SEPARATORS = (",", " ", "\t", "\n", "\r")


def _split_top_level(text: str) -> list[str]:
    """Split on commas/whitespace that are not inside ``[...]``.

    Also validates bracket balance, because this is the one place that sees
    the whole string with its nesting depth.
    """
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            if depth:
                raise ValueError(f"invalid hostlist {text!r}: nested '[' is not allowed")
            depth = 1
        elif ch == "]":
            if not depth:
                raise ValueError(f"invalid hostlist {text!r}: ']' without matching '['")
            depth = 0
        if ch in _SEPARATORS and not depth:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValueError(f"invalid hostlist {text!r}: unbalanced '[' (missing ']')")
    items.append("".join(current))
    # Empty items (``a,,b`` or a trailing comma) carry no host; SLURM skips
    # them too, so we do the same rather than inventing an empty hostname.
    return [item for item in items if item]


def _expand_ranges(body: str, text: str) -> list[str]:
    """Expand the inside of one bracket group, e.g. ``01-04,07``."""
    if not body.strip():
        raise ValueError(f"invalid hostlist {text!r}: empty brackets '[]'")
    values: list[str] = []
    for part in body.split(","):
        if not part:
            raise ValueError(f"invalid hostlist {text!r}: empty range in '[{body}]'")
        lo_s, sep, hi_s = part.partition("-")
        if not sep:
            hi_s = lo_s
        if not (lo_s.isdigit() and hi_s.isdigit() and lo_s.isascii() and hi_s.isascii()):
            raise ValueError(
                f"invalid hostlist {text!r}: range {part!r} must be N or N-M "
                "with non-negative decimal numbers"
            )
        lo, hi = int(lo_s), int(hi_s)
        if lo > hi:
            raise ValueError(
                f"invalid hostlist {text!r}: reversed range {part!r} ({lo} > {hi})"
            )
        if hi - lo + 1 > MAX_HOSTS:
            raise ValueError(
                f"invalid hostlist {text!r}: range {part!r} has more than {MAX_HOSTS} hosts"
            )
        # SLURM pads to the width of the *low* bound: [08-10] -> 08 09 10,
        # [8-10] -> 8 9 10.
        width = len(lo_s)
        values.extend(f"{n:0{width}d}" for n in range(lo, hi + 1))
    return values


def _slurm_nesting(n_groups: int) -> list[int]:
    """Loop nesting (outermost first) SLURM uses for ``n_groups`` bracket groups.

    SLURM's ``_push_range_list`` keeps the last group as the innermost range,
    then peels the remaining groups off from the right with ``strrchr('[')``,
    each recursion becoming a *deeper* loop.  So groups g0..g(k-1) nest as
    g(k-2), g(k-3), ..., g0, g(k-1).  For one or two groups this is plain
    "leftmost varies slowest"; from three groups on it is not.
    """
    if n_groups <= 1:
        return list(range(n_groups))
    return list(range(n_groups - 2, -1, -1)) + [n_groups - 1]


def _expand_item(item: str, text: str) -> list[str]:
    """Expand one top-level item such as ``rack[1-2]-n[01-02]``."""
    # Split into literal text and bracket groups.  Balance was already
    # checked by _split_top_level.
    literals: list[str] = []
    groups: list[list[str]] = []
    rest = item
    while "[" in rest:
        prefix, _, rest = rest.partition("[")
        body, _, rest = rest.partition("]")
        literals.append(prefix)
        groups.append(_expand_ranges(body, text))
    literals.append(rest)

    total = 1
    for choices in groups:
        total *= len(choices)
    if total > MAX_HOSTS:
        raise ValueError(f"invalid hostlist {text!r}: expands to more than {MAX_HOSTS} hosts")

    order = _slurm_nesting(len(groups))
    hosts = []
    for combo in itertools.product(*(groups[g] for g in order)):
        chosen = [""] * len(groups)
        for g, value in zip(order, combo):
            chosen[g] = value
        parts = [literals[0]]
        for value, literal in zip(chosen, literals[1:]):
            parts += [value, literal]
        hosts.append("".join(parts))
    return hosts


def expand_hostlist(text: str) -> list[str]:
    """Expand a SLURM compressed hostlist into individual hostnames.

    >>> expand_hostlist("node[01-03,07],gpu-a[1-2]")
    ['node01', 'node02', 'node03', 'node07', 'gpu-a1', 'gpu-a2']
    >>> expand_hostlist("rack[1-2]-n[01-02]")
    ['rack1-n01', 'rack1-n02', 'rack2-n01', 'rack2-n02']

    Raises :class:`ValueError` (naming the offending text) for an empty list,
    unbalanced or nested brackets, empty ``[]``, non-numeric or reversed
    ranges, and lists that would expand to more than :data:`MAX_HOSTS` hosts.
    """
    if not isinstance(text, str):
        raise TypeError(f"hostlist must be a str, not {type(text).__name__}")
    items = _split_top_level(text)
    if not items:
        raise ValueError(f"invalid hostlist {text!r}: it contains no hostnames")
    hosts: list[str] = []
    for item in items:
        hosts.extend(_expand_item(item, text))
        if len(hosts) > MAX_HOSTS:
            raise ValueError(
                f"invalid hostlist {text!r}: expands to more than {MAX_HOSTS} hosts"
            )
    return hosts


def _scontrol_first_host(nodelist: str) -> str | None:
    """First host according to ``scontrol show hostnames``, or None if unavailable."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        proc = subprocess.run(
            [scontrol, "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=_SCONTROL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        # Broken install, or hung: fall back to the pure parser.
        return None
    # slurm 22.05 exits 0 even for "Invalid hostlist" (printed on stderr, with
    # nothing on stdout), so an error message counts as failure too.
    if proc.returncode != 0 or "invalid" in proc.stderr.lower():
        return None
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line:
            return line
    return None


def first_host(nodelist: str) -> str:
    """Return the first hostname of a SLURM hostlist (the usual rendezvous master).

    Uses ``scontrol show hostnames`` when the binary is on ``PATH`` and answers
    within a few seconds, so the answer matches exactly what SLURM's own tools
    and sbatch scripts compute. (scontrol needs a readable slurm.conf, not a
    running controller; without one it fails at once.) Otherwise expands the
    list with :func:`expand_hostlist`.

    Raises :class:`ValueError` if the list is empty or malformed. Where
    scontrol is more lenient than :func:`expand_hostlist` (e.g. ``a[1-]``,
    which SLURM reads as ``a1``) SLURM's answer wins.
    """
    if not isinstance(nodelist, str):
        raise TypeError(f"nodelist must be a str, not {type(nodelist).__name__}")
    if not nodelist.strip():
        raise ValueError(f"invalid hostlist {nodelist!r}: it contains no hostnames")
    host = _scontrol_first_host(nodelist)
    if host is not None:
        return host
    return expand_hostlist(nodelist)[0]
