"""The training-curve PNG saved beside the adapter: loss (and LR) over steps, and throughput."""

from __future__ import annotations

from pathlib import Path


def plot_curve(metrics: list[dict], out: str | Path, title: str = "training") -> Path:
    """Write a two-panel PNG (loss + LR, tokens/s) from per-step metrics; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = [m["step"] for m in metrics]
    fig, (ax_loss, ax_tps) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, constrained_layout=True)
    ax_loss.plot(steps, [m["loss"] for m in metrics], color="tab:blue", lw=1.2, label="loss")
    ax_loss.set_ylabel("loss (mean over loss tokens)")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_lr = ax_loss.twinx()
    ax_lr.plot(steps, [m["lr"] for m in metrics], color="tab:orange", lw=1, ls="--", label="lr")
    ax_lr.set_ylabel("learning rate", color="tab:orange")
    ax_tps.plot(steps, [m.get("tokens_per_s", 0.0) for m in metrics], color="tab:green", lw=1)
    ax_tps.set_ylabel("tokens/s (all workers)")
    ax_tps.set_xlabel("optimizer step")
    ax_tps.grid(alpha=0.3)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
