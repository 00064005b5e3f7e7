"""Benchmark records on screen, on disk (JSON or CSV) and as a plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lowformer.errors import LowformerError, import_optional
from lowformer.files import atomic_output, check_output_path

__all__ = ["RECORD_FIELDS", "OUTPUT_SUFFIXES", "PLOT_SUFFIXES", "format_table", "write_records", "read_records",
           "plot_figure", "plot_records"]

OUTPUT_SUFFIXES = (".json", ".csv")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")

# Column order of the CSV (JSON records carry the same keys, plus backend-specific extras).
RECORD_FIELDS = [
    "model", "registry_name", "backend", "mode", "batch_size", "image_size", "image_width", "device", "device_type",
    "threads", "torch_version", "timm_version", "load_avg_1m", "omp_wait_policy", "amp", "deployed", "median_ms", "min_ms",
    "mean_ms", "iqr_ms", "samples", "calls_per_sample", "noisy", "images_per_s", "params", "macs",
    "max_abs_diff", "min_cosine", "lossy", "session_threads", "cpu_flags", "rounds", "job", "jobs",
]


def format_table(records: list[dict[str, Any]]) -> str:
    """One line per record; ms per batch, images per second, params and MACs in millions."""
    lines = [f"{'model':<22} {'backend':<18} {'batch':>5} {'size':>5} {'thr':>3} {'job':>3} {'median ms':>10} "
             f"{'min ms':>9} {'IQR ms':>8} {'img/s':>9} {'params M':>8} {'MACs M':>8} {'max diff':>8}"]
    for r in records:
        job = "" if r.get("job") is None else str(r["job"])
        lines.append(
            f"{r['model']:<22} {r['backend']:<18} {r['batch_size']:>5} {r['image_size']:>5} {r['threads']:>3} "
            f"{job:>3} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} {r['iqr_ms']:>8.2f} {r['images_per_s']:>9.1f} "
            f"{r['params'] / 1e6:>8.2f} {r['macs'] / 1e6:>8.1f} {r['max_abs_diff']:>8.1e}"
            + ("  (noisy)" if r.get("noisy") else ""))
    if records:
        r = records[0]
        lines.append(f"device: {r['device']}, torch {r['torch_version']}, timm {r['timm_version']}, "
                     f"{r['amp']}, load average at start {r['load_avg_1m']:.2f}"
                     + (", deployed (reparameterize_model)" if r["deployed"] else ""))
    return "\n".join(lines)


def write_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """``.json``: a list of records; ``.csv``: one row per record with RECORD_FIELDS as columns. The file is
    written under a temporary name and renamed, so a failure leaves an existing file as it was."""
    path = check_output_path(path, OUTPUT_SUFFIXES, "--out")
    with atomic_output(path) as tmp:
        if path.suffix.lower() == ".json":
            tmp.write_text(json.dumps(records, indent=1) + "\n")
        else:
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=RECORD_FIELDS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(records)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records written by ``write_records`` (CSV values come back as strings, numbers converted)."""
    path = Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for k, v in row.items():
            try:
                row[k] = int(v)
            except ValueError:
                try:
                    row[k] = float(v)
                except ValueError:
                    pass
    return rows


def _series_label(r: dict[str, Any]) -> str:
    amp = "" if r.get("amp", "fp32") == "fp32" else f" {r['amp']}"
    return f"{r['backend']}{amp}, {r['threads']} thread{'s' if int(r['threads']) != 1 else ''}"


_NOISY_LABEL = "hatched: noisy (IQR > 10% of the median, or < 3 samples)"


def plot_figure(records: list[dict[str, Any]], title: str = "") -> Any:
    """A matplotlib figure of ``records`` (per-process rows of a parallel run left out, aggregates kept).

    One size: a panel per batch size, batch 1 (the headline latency) first, each with grouped bars per model
    for every (backend, threads) series: median ms per image, IQR error bars, noisy figures hatched. Several
    sizes: median ms per batch against image size, one line per (model, backend, batch, threads)."""
    import_optional("matplotlib", "plot", "--plot").use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    records = [r for r in records if r.get("job") in (None, "", "all")]
    if not records:
        raise LowformerError("nothing to plot: no benchmark records")
    sizes = sorted({r["image_size"] for r in records})
    batches = sorted({r["batch_size"] for r in records}, key=lambda b: (b != 1, b))
    models = list(dict.fromkeys(r["model"] for r in records))
    labels = list(dict.fromkeys(_series_label(r) for r in records))
    colours = {label: plt.get_cmap("tab20")(i % 20) for i, label in enumerate(labels)}
    any_noisy = any(r.get("noisy") in (True, "True", 1) for r in records)
    if len(sizes) > 1:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        axes = [ax]
        series: dict[str, list] = {}
        for r in records:
            series.setdefault(f"{r['model']} {_series_label(r)} b{r['batch_size']}", []).append(r)
        for label, rs in series.items():
            rs.sort(key=lambda r: r["image_size"])
            ax.errorbar([r["image_size"] for r in rs], [r["median_ms"] for r in rs],
                        yerr=[r["iqr_ms"] / 2 for r in rs], marker="o", capsize=3, label=label)
            noisy = [r for r in rs if r.get("noisy") in (True, "True", 1)]
            ax.scatter([r["image_size"] for r in noisy], [r["median_ms"] for r in noisy], s=120, facecolors="none",
                       edgecolors="red", zorder=3)
        ax.set_xlabel("image size (px)")
        ax.set_ylabel("median ms per batch (IQR error bars)")
        if any_noisy:
            ax.scatter([], [], s=120, facecolors="none", edgecolors="red", label="ringed: noisy")
        ax.legend(fontsize=7)
    else:
        fig, axes = plt.subplots(len(batches), 1, figsize=(max(8, 1.2 * len(models) * max(1, len(labels)) / 3),
                                                         4.5 * len(batches)), squeeze=False)
        axes = list(axes[:, 0])
        width = 0.8 / len(labels)
        for ax, batch in zip(axes, batches):
            cells = {(r["model"], _series_label(r)): r for r in records if r["batch_size"] == batch}
            for j, label in enumerate(labels):
                xs, ys, errs, hatches = [], [], [], []
                for i, model in enumerate(models):
                    r = cells.get((model, label))
                    if r is None:
                        continue
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r["median_ms"] / batch)
                    errs.append(r["iqr_ms"] / batch / 2)
                    hatches.append("//" if r.get("noisy") in (True, "True", 1) else "")
                if not xs:
                    continue
                bars = ax.bar(xs, ys, width, yerr=errs, capsize=2, color=colours[label], label=label)
                for bar, hatch in zip(bars, hatches):
                    bar.set_hatch(hatch)
            ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
            what = "headline latency" if batch == 1 else "throughput: 1000 / ms = images per second"
            ax.set_title(f"batch {batch} ({what}), {sizes[0]} px", fontsize=9)
            ax.set_ylabel("median ms per image (IQR error bars)")
            handles, names = ax.get_legend_handles_labels()
            if any_noisy:
                handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label=_NOISY_LABEL))
            ax.legend(handles=handles, fontsize=7)
    r = records[0]
    fig.suptitle(title or f"{r['device']}, torch {r['torch_version']}", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_records(records: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """:func:`plot_figure` written to ``path`` (``.png``, ``.pdf`` or ``.svg``) under a temporary name, renamed."""
    import matplotlib.pyplot as plt
    path = check_output_path(path, PLOT_SUFFIXES, "--plot")
    fig = plot_figure(records, title)
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
