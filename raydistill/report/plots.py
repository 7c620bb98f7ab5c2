"""Report figures (matplotlib, headless): accuracy per benchmark, accuracy vs model size, sag on vs off."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from raydistill.report.summary import Series  # noqa: E402

_MODE_HATCH = {"agent": "", "agent_sag": "//", "cot": "..", "rag_cot": "xx"}


def _pct(x: float | None) -> float:
    return 0.0 if x is None else 100.0 * x


def _label_bars(ax, bars, values: list[float | None]) -> None:
    """Value on top of each bar (so a 0 reads as 0, not as a missing bar); `None` = no result, marked n/a."""
    for bar, v in zip(bars, values, strict=True):
        text = "n/a" if v is None else f"{v:.0f}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 1.5),
                    textcoords="offset points", ha="center", va="bottom", fontsize=5.5, rotation=90)


def _values(s: Series, benchmarks: list[str]) -> list[float | None]:
    vals = [None if b not in s.cells or s.cells[b].accuracy is None else _pct(s.cells[b].accuracy)
            for b in benchmarks]
    macro = s.macro_accuracy(benchmarks)
    return [*vals, None if macro is None else _pct(macro)]


def _bar_series(ax, slot: int, k: int, vals: list[float | None], labelled: bool, **style) -> None:
    """Bar `slot` of the `k` bars in every group (one group per value); `labelled` writes the values on top."""
    width = 0.8 / k
    xs = [g + (slot - (k - 1) / 2) * width for g in range(len(vals))]
    bars = ax.bar(xs, [v or 0.0 for v in vals], width=width * 0.95, edgecolor="black", linewidth=0.4, **style)
    if labelled:
        _label_bars(ax, bars, vals)


def _finish_grouped(fig, ax, groups: list[str], k: int, title: str, path: Path) -> Path:
    """Axes, legend and file of a grouped accuracy bar chart with `k` bars per group."""
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 108)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(k, 4), loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_by_benchmark(series: list[Series], benchmarks: list[str], path: Path) -> Path:
    """Grouped bars: one group per benchmark (plus the macro average), one bar per (model, mode)."""
    groups = [*benchmarks, "average"]
    k = max(len(series), 1)
    fig, ax = plt.subplots(figsize=(min(16.0, max(8.0, 0.9 * len(groups) * max(1.0, k / 4))), 4.8))
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    for i, s in enumerate(series):
        _bar_series(ax, i, k, _values(s, benchmarks), k * len(groups) <= 60, label=s.name, color=cmap(i % cmap.N),
                    hatch=_MODE_HATCH.get(s.mode, ""))
    return _finish_grouped(fig, ax, groups, k, "Accuracy per benchmark", path)


def accuracy_vs_size(series: list[Series], benchmarks: list[str], path: Path) -> Path | None:
    """Macro-average accuracy against model size (log x), one line per mode; None if < 2 sizes are known."""
    sized = [s for s in series if s.model_size_b]
    if len({s.model_size_b for s in sized}) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for mode in sorted({s.mode for s in sized}):
        pts = sorted((s.model_size_b, _pct(s.macro_accuracy(benchmarks)), s.model_label)
                     for s in sized if s.mode == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ticks = sorted({s.model_size_b for s in sized})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("student size (billion parameters)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_ylim(0, 106)
    ax.set_title("Accuracy vs model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def sag_on_off(series: list[Series], benchmarks: list[str], path: Path) -> Path | None:
    """Per benchmark, agent without vs with sag for every model that has both; None if no model has both."""
    by_key = {s.key: s for s in series}
    models = [m for m in dict.fromkeys(s.model_label for s in series)
              if (m, "agent") in by_key and (m, "agent_sag") in by_key]
    if not models:
        return None
    groups = [*benchmarks, "average"]
    k = 2 * len(models)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 * len(groups)), 4.0))
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(models):
        for h, mode in enumerate(("agent", "agent_sag")):
            _bar_series(ax, 2 * j + h, k, _values(by_key[(m, mode)], benchmarks), k * len(groups) <= 60,
                        color=cmap(j % 10), alpha=1.0 if h else 0.55, hatch="//" if h else "",
                        label=f"{m}: sag {'on' if h else 'off'}")
    return _finish_grouped(fig, ax, groups, k, "Self-consistent action generation: off vs on", path)
