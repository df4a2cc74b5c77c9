"""Table tests for distrain.env.hostlist (SLURM compressed hostlists).

The expected values were checked against ``scontrol show hostnames`` from
Debian 12's slurm 22.05; ``test_matches_scontrol`` re-checks them wherever
scontrol is installed (launch/slurm-local/start.sh installs it).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from distrain.env.hostlist import expand_hostlist, first_host

# (compressed text, expected expansion, does slurm 22.05's scontrol accept it?)
CASES: list[tuple[str, list[str], bool]] = [
    # single hosts
    ("node01", ["node01"], True),
    ("localhost", ["localhost"], True),
    ("gpu-a100-07", ["gpu-a100-07"], True),
    ("login1.cluster.example.org", ["login1.cluster.example.org"], True),
    # plain comma lists (order and duplicates kept, as SLURM does)
    ("b,a", ["b", "a"], True),
    ("n1,n1", ["n1", "n1"], True),
    ("a,,b,", ["a", "b"], True),
    ("a b\tc", ["a", "b", "c"], True),
    # ranges, zero padding = width of the low bound
    ("node[1-3]", ["node1", "node2", "node3"], True),
    ("node[01-04]", ["node01", "node02", "node03", "node04"], True),
    ("node[08-11]", ["node08", "node09", "node10", "node11"], True),
    ("node[1-010]", [f"node{i}" for i in range(1, 11)], True),
    ("node[001-3]", ["node001", "node002", "node003"], True),
    ("n[98-101]", ["n98", "n99", "n100", "n101"], True),
    ("n[0-2]", ["n0", "n1", "n2"], True),
    ("n[7]", ["n7"], True),
    # several ranges in one group, kept in written order
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"], True),
    ("n[3-4,1-2]", ["n3", "n4", "n1", "n2"], True),
    ("n[1,1]", ["n1", "n1"], True),
    # mixed lists
    ("node[01-04,07],gpu-a[1-2]",
     ["node01", "node02", "node03", "node04", "node07", "gpu-a1", "gpu-a2"], True),
    ("login1,c[1-2],gpu-01", ["login1", "c1", "c2", "gpu-01"], True),
    ("c457-[011-012],c439-021", ["c457-011", "c457-012", "c439-021"], True),
    ("cpu.r1-[1-2],cpu.r2-[3]", ["cpu.r1-1", "cpu.r1-2", "cpu.r2-3"], True),
    ("[1-2]", ["1", "2"], True),
    # several bracket groups in one name: cartesian product in SLURM's order
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"], True),
    ("a[1-2,5]-b[1,3]", ["a1-b1", "a1-b3", "a2-b1", "a2-b3", "a5-b1", "a5-b3"], True),
    ("x[1-2]y[3-4]", ["x1y3", "x1y4", "x2y3", "x2y4"], True),
    ("n[1-2],m[1-2]-x[1-2]", ["n1", "n2", "m1-x1", "m1-x2", "m2-x1", "m2-x2"], True),
    # three groups: SLURM nests the middle group outermost (not lexicographic)
    ("a[1-2]-b[1-2]-c[1-2]",
     ["a1-b1-c1", "a1-b1-c2", "a2-b1-c1", "a2-b1-c2",
      "a1-b2-c1", "a1-b2-c2", "a2-b2-c1", "a2-b2-c2"], True),
    ("a[1-2]-b[1-2]-c[1-2]-d[1-2]",
     ["a1-b1-c1-d1", "a1-b1-c1-d2", "a2-b1-c1-d1", "a2-b1-c1-d2",
      "a1-b2-c1-d1", "a1-b2-c1-d2", "a2-b2-c1-d1", "a2-b2-c1-d2",
      "a1-b1-c2-d1", "a1-b1-c2-d2", "a2-b1-c2-d1", "a2-b1-c2-d2",
      "a1-b2-c2-d1", "a1-b2-c2-d2", "a2-b2-c2-d1", "a2-b2-c2-d2"], True),
    # text after the last group: our extension (slurm 22.05 rejects it)
    ("n[1-2].cluster", ["n1.cluster", "n2.cluster"], False),
    ("node[1-2]-ib", ["node1-ib", "node2-ib"], False),
]

MALFORMED = [
    "",                 # empty
    "   ",              # only whitespace
    ",",                # only separators
    "node[1-2",         # unbalanced: missing ]
    "node1-2]",         # unbalanced: stray ]
    "node[1-2]]",       # unbalanced: extra ]
    "node[[1-2]]",      # nested brackets
    "node[]",           # empty brackets
    "node[3-1]",        # reversed range
    "node[10-09]",      # reversed range with padding
    "node[1-]",         # open range (SLURM silently reads node1)
    "node[-2]",         # open range
    "node[1,,2]",       # empty element in a range list
    "node[1-2,]",       # trailing comma in a range list
    "node[a-c]",        # not numbers
    "node[1x2]",        # multi-dimensional boxes are not supported
    "node[1-2-3]",      # two dashes
    "node[ 1-2]",       # whitespace inside brackets
    "node[1-99999999]", # absurdly large
]


@pytest.mark.parametrize(("text", "expected", "_slurm_ok"), CASES, ids=[c[0] for c in CASES])
def test_expand(text: str, expected: list[str], _slurm_ok: bool) -> None:
    assert expand_hostlist(text) == expected


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 18


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_raises_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError) as info:
        expand_hostlist(text)
    assert repr(text) in str(info.value), "the error message must quote the bad hostlist"


def test_not_a_string() -> None:
    with pytest.raises(TypeError):
        expand_hostlist(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- first_host


def _fake_scontrol(tmp_path, body: str) -> str:
    """Put an executable `scontrol` with the given bash body first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "scontrol"
    script.write_text("#!/bin/bash\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(bindir)


def test_first_host_without_scontrol(monkeypatch, tmp_path) -> None:
    # A PATH with no scontrol at all: the pure parser answers.
    monkeypatch.setenv("PATH", str(tmp_path))
    assert first_host("node[08-10],gpu1") == "node08"
    assert first_host("rack[1-2]-n[01-02]") == "rack1-n01"
    with pytest.raises(ValueError, match="node\\[3-1\\]"):
        first_host("node[3-1]")
    with pytest.raises(ValueError):
        first_host("")


def test_first_host_prefers_scontrol(monkeypatch, tmp_path) -> None:
    bindir = _fake_scontrol(tmp_path, 'echo from-scontrol; echo second')
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ.get("PATH", ""))
    assert first_host("node[1-2]") == "from-scontrol"


@pytest.mark.parametrize(
    "body",
    [
        "exit 1",                                          # scontrol fails
        'echo "Invalid hostlist: $3" >&2; exit 0',         # slurm 22.05: error but rc 0
        "exit 0",                                          # prints nothing
    ],
)
def test_first_host_falls_back_when_scontrol_fails(monkeypatch, tmp_path, body: str) -> None:
    bindir = _fake_scontrol(tmp_path, body)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ.get("PATH", ""))
    assert first_host("node[07-08]") == "node07"


def test_first_host_falls_back_when_scontrol_hangs(monkeypatch, tmp_path) -> None:
    import distrain.env.hostlist as hostlist

    bindir = _fake_scontrol(tmp_path, "exec sleep 30")
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setattr(hostlist, "_SCONTROL_TIMEOUT_S", 0.5)
    assert first_host("node[07-08]") == "node07"


# ---------------------------------------------------------------- real SLURM

SCONTROL = shutil.which("scontrol")
SLURM_CASES = [c for c in CASES if c[2]]


@pytest.fixture(scope="module")
def minimal_slurm_conf(tmp_path_factory) -> str:
    # scontrol refuses to run at all without a parseable slurm.conf (it even
    # tries DNS SRV records), but `show hostnames` needs nothing from it. A
    # two-line config makes this test independent of a running cluster.
    conf = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    conf.write_text("ClusterName=hostlisttest\nSlurmctldHost=localhost\n")
    return str(conf)


def _scontrol_hostnames(text: str, conf: str) -> list[str]:
    assert SCONTROL is not None
    proc = subprocess.run(
        [SCONTROL, "show", "hostnames", text],
        capture_output=True, text=True, timeout=10, check=False,
        env={**os.environ, "SLURM_CONF": conf},
    )
    # slurm 22.05 exits 0 on "Invalid hostlist", so look at stderr too.
    assert proc.returncode == 0 and "invalid" not in proc.stderr.lower(), (
        f"scontrol rejected {text!r}: rc={proc.returncode} stderr={proc.stderr.strip()!r}"
    )
    return proc.stdout.split()


@pytest.mark.skipif(
    SCONTROL is None,
    reason="scontrol is not installed (launch/slurm-local/start.sh installs SLURM); "
    "the expected values were checked against slurm 22.05 by hand",
)
@pytest.mark.parametrize(("text", "expected", "_slurm_ok"), SLURM_CASES, ids=[c[0] for c in SLURM_CASES])
def test_matches_scontrol(
    text: str, expected: list[str], _slurm_ok: bool, minimal_slurm_conf: str, monkeypatch
) -> None:
    assert expand_hostlist(text) == _scontrol_hostnames(text, minimal_slurm_conf) == expected
    # first_host goes through the real scontrol here.
    monkeypatch.setenv("SLURM_CONF", minimal_slurm_conf)
    assert first_host(text) == expected[0]
