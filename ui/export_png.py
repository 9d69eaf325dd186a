"""PNG renderings of the experiment results (matplotlib, Agg), for the Experiments page's downloads."""

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    return buf.getvalue()


def comparison_png(comparison) -> bytes:
    """Validation accuracy of each method against epochs and against seconds, side by side."""
    hist = comparison.history()
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for method, g in hist.groupby("method", sort=False):
        g = g.sort_values("elapsed_seconds")
        by_epoch.plot(g["epoch"], g["val_accuracy"], marker="o", label=method)
        by_time.plot(g["elapsed_seconds"], g["val_accuracy"], marker="o", label=method)
    for ax, xlabel in ((by_epoch, "epoch"), (by_time, "seconds")):
        ax.axhline(comparison.chance_accuracy, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    by_epoch.set_ylabel("validation accuracy")
    by_epoch.set_title("Accuracy vs epochs")
    by_time.set_title("Accuracy vs seconds")
    by_time.legend(loc="lower right")
    fig.tight_layout()
    return _png(fig)


def learning_curve_png(curve) -> bytes:
    """Mean validation accuracy against images per class, with a min-max band per method."""
    table = curve.table()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, g in table.groupby("method", sort=False):
        g = g.sort_values("images_per_class")
        (line,) = ax.plot(g["images_per_class"], g["mean"], marker="o", label=method)
        ax.fill_between(g["images_per_class"], g["min"], g["max"], color=line.get_color(), alpha=0.2)
    ax.axhline(curve.chance_accuracy, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("training images per class")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Learning curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _png(fig)
