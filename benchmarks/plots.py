"""The PNG plots of BENCHMARKS.md (matplotlib, Agg backend: no display needed).

Each method draws one suite's figure into ``out_dir`` and returns its path (None when there is nothing to draw).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


class Plotter:
    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _save(self, fig: Any, name: str, rect: tuple = (0, 0, 1, 1)) -> Path:
        path = self.out_dir / name
        fig.tight_layout(rect=rect)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def plot_step_time(self, result: Dict[str, Any]) -> Optional[Path]:
        """Ratio distrain / raw engine per strategy and model, with the bootstrap 95% interval and the target."""
        models = [m for m, job in result["models"].items() if job["rows"]]
        if not models:
            return None
        fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.6), squeeze=False)
        for ax, model in zip(axes[0], models):
            rows = result["models"][model]["rows"]
            labels = [r["label"] for r in rows]
            ratios = [r["ratio"]["ratio"] for r in rows]
            lo = [r["ratio"]["ratio"] - r["ratio"]["ci_lo"] for r in rows]
            hi = [r["ratio"]["ci_hi"] - r["ratio"]["ratio"] for r in rows]
            colors = ["tab:green" if x <= 1.02 else "tab:red" for x in ratios]
            y = list(range(len(rows)))
            ax.barh(y, [x - 1 for x in ratios], left=1, color=colors, alpha=0.75, xerr=[lo, hi], capsize=3,
                    label="wall-clock median ratio")
            if all("cpu_ratio" in r for r in rows):
                ax.scatter([r["cpu_ratio"]["ratio"] for r in rows], y, marker="D", color="black", s=22, zorder=3,
                           label="main-thread CPU ratio")
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.axvline(1.02, color="tab:red", linestyle="--", linewidth=1, label="target 1.02")
            ax.set_yticks(y, labels)
            ax.invert_yaxis()
            ax.set_xlabel("median step time: distrain / raw engine loop")
            ax.set_title(f"{model}: step time ratio (95% bootstrap CI)")
            ax.legend(loc="lower right", fontsize=8)
        return self._save(fig, "step_time_ratios.png")

    def plot_comm(self, result: Dict[str, Any]) -> Optional[Path]:
        """Per bucket size and hook: the step split into compute and exposed communication, the bytes, and the
        time the all-reduces take against the raw all-reduce of the same bytes."""
        variants = result["variants"]
        if not variants:
            return None
        labels = [v["label"] for v in variants]
        base = result["no_sync"]["median"] * 1e3
        exposed = [max(0.0, v["step"]["median"] * 1e3 - base) for v in variants]
        sent = [v["bytes"].get("all_reduce", 0) / 1024 for v in variants]
        allreduce_ms = [v["collective_s"]["median"] * 1e3 for v in variants]
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.4), sharey=True)
        y = list(range(len(labels)))
        ax1.barh(y, [base] * len(y), color="tab:blue", alpha=0.7, label="compute (step without gradient sync)")
        ax1.barh(y, exposed, left=[base] * len(y), color="tab:orange", alpha=0.85, label="exposed communication")
        ax1.set_yticks(y, labels)
        ax1.invert_yaxis()
        ax1.set_xlabel("median step time, ms")
        ax1.set_title(f"gpt, {result['world_size']} ranks: where the step goes")
        ax1.legend(loc="lower right", fontsize=8)
        ax2.barh(y, sent, color="tab:purple", alpha=0.75)
        ax2.set_xlabel("KiB all-reduced per step (profiler)")
        ax2.set_title("bytes per step")
        ax3.barh(y, allreduce_ms, color="tab:gray", alpha=0.8)
        ax3.axvline(result["raw_allreduce"]["median"] * 1e3, color="tab:red", linestyle="--",
                    label="raw all_reduce of the fp32 gradients")
        if "torch_ddp_allreduce" in result:
            ax3.axvline(result["torch_ddp_allreduce"]["median"] * 1e3, color="black", linestyle=":",
                        label="torch DDP's own all-reduce")
        ax3.set_xlabel("all-reduce time per step, ms (min over ranks)")
        ax3.set_title("collective time: buckets are latency-bound")
        ax3.legend(loc="lower right", fontsize=8)
        return self._save(fig, "comm_buckets_hooks.png")

    def plot_memory(self, rows: List[Dict[str, Any]]) -> Optional[Path]:
        """Measured per-rank model states (stacked params/grads/optimizer) vs the formula, per strategy and N."""
        if not rows:
            return None
        worlds = sorted({r["world"] for r in rows})
        labels = list(dict.fromkeys(r["label"] for r in rows))
        fig, axes = plt.subplots(1, len(worlds), figsize=(5.2 * len(worlds), 4.8), sharey=True, squeeze=False)
        for ax, w in zip(axes[0], worlds):
            mine = {r["label"]: r for r in rows if r["world"] == w}
            y = list(range(len(labels)))
            left = [0.0] * len(labels)
            for kind, color in (("params", "tab:blue"), ("grads", "tab:orange"), ("optimizer", "tab:green")):
                vals = [mine[lab]["measured"][kind] / 1024 if lab in mine else 0 for lab in labels]
                ax.barh(y, vals, left=left, color=color, alpha=0.75, label=kind)
                left = [a + b for a, b in zip(left, vals)]
            pred = [mine[lab]["predicted"] / 1024 if lab in mine else float("nan") for lab in labels]
            ax.scatter(pred, y, marker="|", s=300, color="black", zorder=3, label="formula")
            ax.set_yticks(y, labels)
            ax.invert_yaxis()
            ax.set_title(f"N = {w}")
            ax.set_xlabel("KiB per rank")
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=4, fontsize=9)
        fig.suptitle("model states per rank: measured (bars) vs ZeRO formula (black tick)")
        return self._save(fig, "memory_per_rank.png", rect=(0, 0.07, 1, 1))

    def plot_scaling(self, result: Dict[str, Any]) -> Optional[Path]:
        """samples/s vs world size (ideal linear line from W=1; oversubscribed points hollow) and bytes/sample."""
        rows = result["rows"]
        if not rows:
            return None
        per = result["bytes"].get("bytes_per_sample", {})
        fig, axes = plt.subplots(1, 2 if per else 1, figsize=(12 if per else 6, 4.4), squeeze=False)
        ax = axes[0][0]
        for i, label in enumerate(dict.fromkeys(r["label"] for r in rows)):
            mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["world"])
            color = f"C{i}"
            ws = [r["world"] for r in mine]
            sps = [r["samples_per_s"] for r in mine]
            ax.plot(ws, sps, color=color, label=label)
            for r in mine:
                ax.scatter([r["world"]], [r["samples_per_s"]], color=color, s=50, zorder=3,
                           facecolors="none" if r["oversubscribed"] else color)
            if mine and mine[0]["world"] == 1:
                ax.plot(ws, [sps[0] * w for w in ws], color=color, linestyle=":", alpha=0.6)
        ax.set_xlabel("world size W (hollow: more ranks than cores)")
        ax.set_ylabel("samples/s")
        ax.set_xticks(sorted({r["world"] for r in rows}))
        ax.set_title("gpt weak scaling (dotted: ideal linear)")
        ax.legend(fontsize=8)
        if per:
            ax2 = axes[0][1]
            labels = list(per)
            vals = [per[k]["wire_bytes_per_sample"] / 1024 for k in labels]
            ax2.bar(range(len(labels)), vals, color=["tab:blue"] + ["tab:green"] * (len(labels) - 1), alpha=0.75)
            ax2.set_xticks(range(len(labels)), labels, rotation=20)
            ax2.set_ylabel("KiB on the wire per rank per sample")
            ax2.set_title(f"communication per sample, W={result['bytes']['world_size']}")
        return self._save(fig, "scaling.png")
