"""The scale suite's figure: each cost against the world size W (log-log), and a commit's W-dependent part up to
W = 1,024."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

PANELS = [("first_step_s", "start-up: launch to first step (s)", 1.0),
          ("first_step_per_core_share_s", "start-up per core-share (s)", 1.0),
          ("checkpoint_s", "checkpoint: save to commit (s)", 1.0),
          ("step_s", "step time (ms)", 1e3),
          ("step_per_core_share_s", "step time per core-share (ms)", 1e3),
          ("rank0_peak_rss_mb", "rank 0 peak RSS (MB)", 1.0)]


def plot_scale(result: Dict[str, Any], out_dir: Path) -> Optional[Path]:
    rows = result["rows"]
    if not rows:
        return None
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    worlds = [r["world"] for r in rows]
    for ax, (key, title, scale) in zip(axes.flat, PANELS):
        values = [r[key] * scale for r in rows]
        ax.plot(worlds, values, marker="o")
        factor = result["growth"].get(key)
        ax.set_title(title + ("" if factor is None else f"\nx{factor:.2f} per doubling of W"), fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.axvline(result["cores"], color="grey", linestyle=":", alpha=0.6)  # right of it: more ranks than cores
        ax.set_xlabel(f"W (dotted: {result['cores']} cores)")
    ax = axes.flat[len(PANELS)]
    commit = result["commit"]
    cw = [c["world"] for c in commit]
    for key, label in (("rank_listing_s", "one rank: list + hash its own files"),
                       ("stat_listing_s", "listing with a stat per file (before)"),
                       ("rank0_manifest_s", "rank 0: merge digests + write manifest")):
        ax.plot(cw, [c[key] * 1e3 for c in commit], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(cw, [str(w) for w in cw])
    ax.set_title("commit: the W-dependent part (ms, synthetic)", fontsize=10)
    ax.set_xlabel("W")
    ax.legend(fontsize=7)
    for spare in list(axes.flat)[len(PANELS) + 1:]:
        spare.axis("off")
    fig.tight_layout()
    path = Path(out_dir) / "scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
