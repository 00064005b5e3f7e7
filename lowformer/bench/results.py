"""Benchmark records on screen, on disk (JSON or CSV) and as a plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lowformer.errors import LowformerError

__all__ = ["RECORD_FIELDS", "format_table", "write_records", "read_records", "plot_records"]

# Column order of the CSV (JSON records carry the same keys, plus backend-specific extras).
RECORD_FIELDS = [
    "model", "registry_name", "backend", "mode", "batch_size", "image_size", "device", "device_type", "threads",
    "torch_version", "timm_version", "load_avg_1m", "omp_wait_policy", "amp", "deployed", "median_ms", "min_ms",
    "mean_ms", "iqr_ms", "samples", "calls_per_sample", "noisy", "images_per_s", "params", "macs",
    "max_abs_diff", "rounds", "job", "jobs",
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
    """``.json``: a list of records; ``.csv``: one row per record with RECORD_FIELDS as columns."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1) + "\n")
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RECORD_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)
    else:
        raise LowformerError(f"cannot write '{path}': use a .json or .csv file name")


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


def plot_records(records: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Latency versus resolution per model when several image sizes were measured, else throughput
    (images/s) versus MACs, one marker per (model, backend) and one colour per backend/batch/threads."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise LowformerError("--plot needs matplotlib: pip install 'lowformer[plot]'") from e
    records = [r for r in records if r.get("job") in (None, "", "all")]
    sizes = {r["image_size"] for r in records}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    if len(sizes) > 1:
        series: dict[str, list] = {}
        for r in records:
            series.setdefault(f"{r['model']} {r['backend']} b{r['batch_size']} t{r['threads']}", []).append(r)
        for label, rs in series.items():
            rs.sort(key=lambda r: r["image_size"])
            ax.plot([r["image_size"] for r in rs], [r["median_ms"] for r in rs], marker="o", label=label)
        ax.set_xlabel("image size (px)")
        ax.set_ylabel("median ms per batch")
    else:
        groups: dict[str, list] = {}
        for r in records:
            groups.setdefault(f"{r['backend']} b{r['batch_size']} t{r['threads']}", []).append(r)
        for label, rs in groups.items():
            ax.scatter([r["macs"] / 1e9 for r in rs], [r["images_per_s"] for r in rs], label=label)
        for r in records:
            if r["backend"] == records[0]["backend"] and r["batch_size"] == records[0]["batch_size"] \
                    and r["threads"] == records[0]["threads"]:
                ax.annotate(r["model"], (r["macs"] / 1e9, r["images_per_s"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel("images / s (median)")
        ax.set_yscale("log")
    if records:
        r = records[0]
        ax.set_title(title or f"{r['device']}, torch {r['torch_version']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
