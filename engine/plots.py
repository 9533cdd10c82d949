"""`lancet repair --plot`: what a repair did, for people who would rather look than read the report.

Left: the accuracy change of each class of x_clean (points; bar labels: the accuracy after). Right, fine-tuning:
the kept run's held-back loss and accuracy per epoch (best epoch marked); flip: every option the search
weighed, overall clean-accuracy drop against the largest drop of one class, the picked option circled.
"""
from __future__ import annotations

import io
from pathlib import Path

from .io import write_bytes_atomic

MAX_LABELLED_CLASSES = 30  # beyond this the bars go unlabelled


def plot_repair(report: dict, path: str | Path) -> None:
    """Write the repair's PNG (see the module docstring) atomically to `path`, from its JSON report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (classes, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"wspace": 0.35})
    _plot_classes(classes, report)
    if report.get("finetune", {}).get("history"):
        _plot_history(right, report["finetune"])
    elif report.get("flip", {}).get("options"):
        _plot_flip_options(right, report["flip"])
    else:
        right.set_axis_off()
    fig.suptitle(f"lancet repair ({report['method']}): {report['status']}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=110)
    plt.close(fig)
    write_bytes_atomic(Path(path), buffer.getvalue())


def _plot_classes(axis, report: dict) -> None:
    before = report.get("before", {}).get("clean_class_accuracy", {})
    after = report.get("after", {}).get("clean_class_accuracy", {})
    labels = sorted(before, key=int)
    change = [100.0 * (after.get(c, before[c]) - before[c]) for c in labels]
    axis.bar(range(len(labels)), change, color=["crimson" if d < 0 else "seagreen" for d in change])
    axis.axhline(0, color="black", lw=0.8)
    for index, (label, delta) in enumerate(zip(labels, change)):
        if len(labels) > MAX_LABELLED_CLASSES:
            break
        axis.annotate(f"{100 * after.get(label, before[label]):.0f}", (index, delta), ha="center",
                      va="top" if delta < 0 else "bottom", fontsize="small")
    overall = 100.0 * (report.get("after", {}).get("clean_accuracy", 0.0)
                       - report.get("before", {}).get("clean_accuracy", 0.0))
    if len(labels) <= MAX_LABELLED_CLASSES:
        axis.set_xticks(range(len(labels)), labels)
        axis.set_xlabel("class (bar label: accuracy after, %)")
    else:  # hundreds of classes: the bars' shape, not their names
        axis.set_xlabel(f"class index (0-{len(labels) - 1})")
    axis.set_ylabel("accuracy change on x_clean (points)")
    axis.set_title(f"per-class accuracy change (overall {overall:+.1f} points)")
    low, high = min(change + [0.0]), max(change + [0.0])
    pad = 0.15 * max(high - low, 1.0)
    axis.set_ylim(low - pad, high + pad)


def _plot_history(axis, finetune: dict) -> None:
    history = finetune["history"]
    epochs = [h["epoch"] for h in history]
    axis.plot(epochs, [h["heldback_loss"] for h in history], "o-", label="held-back loss")
    twin = axis.twinx()
    twin.plot(epochs, [h["heldback_accuracy"] for h in history], "s-", color="tab:green",
              label="held-back accuracy")
    twin.set_ylabel("held-back accuracy")
    axis.axvline(finetune["best_epoch"], color="gray", ls="--", label=f"kept: epoch {finetune['best_epoch']}")
    axis.set_xlabel("epoch")
    axis.set_ylabel("held-back loss")
    start = "zero" if finetune.get("start") == "ablated" else "their values"
    axis.set_title(f"fine-tuning (EINs trained from {start})")
    lines = axis.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    axis.legend(lines[0] + more[0], lines[1] + more[1], loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3,
                fontsize="small")


def _plot_flip_options(axis, flip: dict) -> None:
    for scope in dict.fromkeys(o["scope"] for o in flip["options"]):
        mine = [o for o in flip["options"] if o["scope"] == scope]
        axis.plot([o["drop_points"] for o in mine], [o["class_drop_points"] for o in mine], "o", label=scope)
    picked = [o for o in flip["options"] if (o["scope"], o["margin"]) == (flip["scope"], flip["margin"])]
    if picked:
        axis.plot(picked[0]["drop_points"], picked[0]["class_drop_points"], "o", ms=14, mfc="none",
                  color="black", label=f"picked: {picked[0]['k']} neurons")
    axis.set_xlabel("clean-accuracy drop (points)")
    axis.set_ylabel("largest drop of one class (points)")
    axis.set_title("flip options weighed")
    axis.legend(loc="upper left", fontsize="small")
