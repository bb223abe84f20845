"""The report: result JSONs (+ training runs' metrics.jsonl) → report.md, report.json and PNG plots.

It only aggregates. One table per eval dataset: rows are encoders (in the order first given),
columns are protocols (linear, knn, fewshot-1shot, fewshot-5shot, …, finetune); each cell is
mean ± std over seeds in percent. With `across_runs`, results of the same encoder name from several
result files (e.g. the pipeline repeated with `--seed 0/1/2`) are combined instead of the last one
winning: the cell is the mean ± sample std over those runs of each run's own mean, so the spread is
over training runs. Results of one dataset computed on different subsets (other train/val counts or
per-class limits, another subsample seed) are never mixed: each subset gets its own table, named
"<dataset> [N train / M val]", and the report opens with a warning saying so. Paths are printed as
the results recorded them (as the user gave them). Plots (matplotlib, Agg backend, no display needed):
  bars-<dataset>.png    one panel per protocol, a bar per encoder with ±std error bars (Figure 1 style)
  fewshot-<dataset>.png top-1 over shots per encoder with ±std error bars
  losses.png            each run's training loss over steps (one panel per run: MAE pixel MSE and
                        WSP cross-entropy are on different scales)
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maws_eval.config import PROTOCOLS
from maws_eval.metrics import format_value, mean_std
from maws_eval.protocol import load_results, slug, write_json_atomic

COLORS = ("#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


@dataclass(frozen=True)
class Cell:
    value: float
    std: float | None
    n: int             # seeds behind the number (evaluation seeds, or training runs with across_runs)
    command: str       # the command(s) that produced it, one per line
    file: str          # the result file(s), one per line


def combine_runs(cells: list[Cell]) -> Cell:
    """One cell from the same measurement in several training runs: mean ± sample std of their means."""
    if len(cells) == 1:
        return cells[0]
    mean, std = mean_std([c.value for c in cells])
    commands = "\n".join(dict.fromkeys(c.command for c in cells))
    return Cell(value=mean, std=std, n=len(cells), command=commands, file="\n".join(c.file for c in cells))


def column(record: dict[str, Any]) -> str:
    return f"{record['protocol']}-{record['shots']}shot" if record.get("shots") is not None else record["protocol"]


def _column_order(col: str) -> tuple[int, int, str]:
    protocol, _, shots = col.partition("-")
    rank = PROTOCOLS.index(protocol) if protocol in PROTOCOLS else len(PROTOCOLS)
    return rank, int(shots.removesuffix("shot")) if shots else 0, col


# data_config fields that choose which images a number was computed on
_SUBSET_FIELDS = ("max_train_per_class", "max_val_per_class", "subsample_seed", "val_fraction")


def subset(record: dict[str, Any]) -> tuple:
    """What makes two results of one dataset comparable: the same images (counts and how they were chosen)."""
    data = record.get("data_config") or {}
    return (record.get("num_train"), record.get("num_val"), record.get("num_classes"),
            *(data.get(k) for k in _SUBSET_FIELDS))


def table_names(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The table each record goes to (its dataset, split by subset when a dataset has several) and warnings."""
    subsets: dict[str, list[tuple]] = defaultdict(list)
    for rec in records:
        if subset(rec) not in subsets[rec["dataset"]]:
            subsets[rec["dataset"]].append(subset(rec))
    warnings, labels = [], {}
    for dataset, keys in subsets.items():
        if len(keys) == 1:
            labels[dataset, keys[0]] = dataset
            continue
        counts = [f"{k[0]} train / {k[1]} val" for k in keys]
        for i, (key, count) in enumerate(zip(keys, counts)):
            labels[dataset, key] = f"{dataset} [{count}]" if counts.count(count) == 1 else f"{dataset} [{count}, #{i + 1}]"
        warnings.append(f"results for {dataset} come from {len(keys)} different subsets of its images "
                        f"({'; '.join(counts)}); they are shown as separate tables, not compared in one")
    return [labels[r["dataset"], subset(r)] for r in records], warnings


def build_tables(records: list[dict[str, Any]], encoder_order: Sequence[str] = (), *,
                 across_runs: bool = False) -> dict[str, Any]:
    """{table: {"encoders": [...], "columns": [...], "info", "cells": {enc: {col: Cell}}}}, one table per
    dataset and subset (`table_names`, which also gives the warnings `write_report` prints).

    A later result for the same (table, encoder, column) replaces an earlier one (re-runs win),
    unless `across_runs`: then results from different files are combined (`combine_runs`).
    """
    runs: dict[tuple[str, str, str], list[Cell]] = defaultdict(list)
    tables: dict[str, Any] = {}
    names, _ = table_names(records)
    for rec, name in zip(records, names):
        t = tables.setdefault(name, {"encoders": [], "columns": [], "cells": defaultdict(dict), "info": {}})
        enc, col = rec["encoder"], column(rec)
        if enc not in t["encoders"]:
            t["encoders"].append(enc)
        if col not in t["columns"]:
            t["columns"].append(col)
        cell = Cell(
            value=rec["value"], std=rec.get("std"), n=max(1, len(rec.get("values") or [rec["value"]])),
            command=rec.get("command", ""), file=rec.get("_file", ""),
        )
        runs[name, enc, col].append(cell)
        t["cells"][enc][col] = combine_runs(runs[name, enc, col]) if across_runs else cell
        t["info"] = {k: rec.get(k) for k in ("num_train", "num_val", "num_classes", "dataset_path")}
        t.setdefault("notes", {})
        for note in rec.get("notes") or []:
            t["notes"].setdefault(note, None)
    for t in tables.values():
        given = [e for e in encoder_order if e in t["encoders"]]
        t["encoders"] = given + [e for e in t["encoders"] if e not in given]
        t["columns"].sort(key=_column_order)
        t["notes"] = list(t["notes"])
    return tables


def read_run(run_dir: Path) -> dict[str, Any]:
    """A training run's loss curve from metrics.jsonl: every line with a step and a `*loss` number."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a maws-train run directory?)")
    steps, losses, key = [], [], None
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not JSON ({e})") from e
        if key is None:
            candidates = [k for k, v in row.items() if "loss" in k and isinstance(v, (int, float))]
            key = "loss" if "loss" in candidates else (min(candidates) if candidates else None)
        if key is None or not isinstance(row.get(key), (int, float)):
            continue
        steps.append(row.get("step", len(steps)))
        losses.append(float(row[key]))
    config = {}
    if (Path(run_dir) / "config.json").is_file():
        config = json.loads((Path(run_dir) / "config.json").read_text())
    return {"name": Path(run_dir).name, "path": str(run_dir), "loss_key": key, "steps": steps, "losses": losses,
            "config": config}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on headless machines and in tests
    import matplotlib.pyplot as plt

    return plt


def plot_bars(table: dict[str, Any], dataset: str, path: Path) -> Path:
    plt = _plt()
    cols, encs = table["columns"], table["encoders"]
    fig, axes = plt.subplots(1, len(cols), figsize=(2.2 + 1.0 * len(encs) * len(cols) ** 0.5 * 1.3, 3.6),
                             squeeze=False)
    chance = 100.0 / table["info"]["num_classes"] if table["info"].get("num_classes") else None
    for ax, col in zip(axes[0], cols):
        vals = [table["cells"][e].get(col) for e in encs]
        heights = [c.value * 100 if c else 0.0 for c in vals]
        errs = [(c.std or 0.0) * 100 if c else 0.0 for c in vals]
        bars = ax.bar(range(len(encs)), heights, color=COLORS[: len(encs)])
        spread = [i for i, c in enumerate(vals) if c and c.std is not None]  # no whisker for single runs
        if spread:
            ax.errorbar(spread, [heights[i] for i in spread], yerr=[errs[i] for i in spread], fmt="none",
                        ecolor="black", capsize=3, lw=1)
        for bar, c, err in zip(bars, vals, errs):
            label = f"{c.value * 100:.1f}" if c else "n/a"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height() + err), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
        if chance:
            ax.axhline(chance, color="black", lw=0.8, ls="--")
        ax.set_title(col, fontsize=9, pad=12)
        ax.set_xticks(range(len(encs)), encs, rotation=35, ha="right", fontsize=8)
        # headroom above the tallest bar + error bar for the value labels (up to 100% + labels)
        top = max([h + e for h, e in zip(heights, errs)] + [chance or 0])
        ax.set_ylim(0, min(112.0, top * 1.15 + 3))
    axes[0][0].set_ylabel("top-1 (%)")
    fig.suptitle(f"{dataset}: top-1 by protocol (dashed: chance)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fewshot(table: dict[str, Any], dataset: str, path: Path) -> Path | None:
    shot_cols = [c for c in table["columns"] if c.startswith("fewshot-")]
    if not shot_cols:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    n_enc = len(table["encoders"])
    for i, (color, enc) in enumerate(zip(COLORS, table["encoders"])):
        pts = [(int(c.split("-")[1].removesuffix("shot")), table["cells"][enc][c]) for c in shot_cols
               if c in table["cells"][enc]]
        # dodge each encoder slightly along the (log) x axis so error bars do not hide each other
        dodge = 1.0 + 0.03 * (i - (n_enc - 1) / 2)
        if pts:
            ax.errorbar([s * dodge for s, _ in pts], [c.value * 100 for _, c in pts], yerr=[(c.std or 0) * 100 for _, c in pts],
                        marker="o", capsize=3, label=enc, color=color)
    if table["info"].get("num_classes"):
        ax.axhline(100.0 / table["info"]["num_classes"], color="black", lw=0.8, ls="--", label="chance")
    ax.set_xscale("log")
    shots = sorted({int(c.split("-")[1].removesuffix("shot")) for c in shot_cols})
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # log axis: only the shot counts are labelled
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{dataset}: few-shot (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_losses(runs: list[dict[str, Any]], path: Path) -> Path | None:
    runs = [r for r in runs if r["losses"]]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(3.4 * len(runs), 3.0), squeeze=False)
    for ax, run, color in zip(axes[0], runs, COLORS[1:]):
        ax.plot(run["steps"], run["losses"], color=color, lw=1.2)
        ax.set_title(run["name"], fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(run["loss_key"])
        ax.grid(alpha=0.3)
    fig.suptitle("training loss", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _markdown(tables: dict[str, Any], runs: list[dict[str, Any]], plots: list[str], *,
              across_runs: bool = False, warnings: Sequence[str] = ()) -> str:
    lines = ["# MAWS evaluation report", ""]
    lines += [f"> **Warning:** {w}" for w in warnings] + ([""] if warnings else [])
    spread = ("the mean and sample std over training runs of each run's own number" if across_runs else
              "the mean and sample std over evaluation seeds")
    lines += [(f"Top-1 accuracy (%) on the val split; `mean ± std` is {spread}, a bare number is "
               "a single run. Protocols: see docs/eval.md."), ""]
    for dataset, t in tables.items():
        info = t["info"]
        chance = f"; chance = {100.0 / info['num_classes']:.1f}%" if info.get("num_classes") else ""
        lines += [f"## {dataset}", "",
                  (f"{info.get('num_classes')} classes, {info.get('num_train')} train / {info.get('num_val')} val "
                   f"images ({info.get('dataset_path')}){chance}."), ""]
        lines.append("| encoder | " + " | ".join(t["columns"]) + " |")
        lines.append("|---|" + "---:|" * len(t["columns"]))
        for enc in t["encoders"]:
            cells = [format_value(c.value, c.std) if (c := t["cells"][enc].get(col)) else "–" for col in t["columns"]]
            lines.append(f"| {enc} | " + " | ".join(cells) + " |")
        lines.append("")
        if t["notes"]:
            lines += ["Adjusted while evaluating:", "", *[f"- {n}" for n in t["notes"]], ""]
        for p in plots:
            if slug(dataset) in p and not p.startswith("losses"):
                lines += [f"![{p}]({p})", ""]
    if runs:
        lines += ["## Training runs", "", "| run | steps | first loss | last loss |", "|---|---:|---:|---:|"]
        for r in runs:
            if r["losses"]:
                lines.append(f"| {r['name']} | {r['steps'][-1]} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |")
            else:
                lines.append(f"| {r['name']} | 0 | – | – |")
        lines.append("")
        if "losses.png" in plots:
            lines += ["![losses.png](losses.png)", ""]
    lines += ["## Commands", "", "Every number above came from one of these commands:", ""]
    produced: dict[str, list[str]] = {}
    for dataset, t in tables.items():
        for enc in t["encoders"]:
            for col in t["columns"]:
                for command in (c.command.splitlines() if (c := t["cells"][enc].get(col)) else []):
                    produced.setdefault(command, []).append(f"{dataset}/{enc}/{col}")
    for command, cells in produced.items():
        lines += [f"- {len(cells)} cells ({', '.join(sorted({c.split('/')[1] for c in cells}))}):", "",
                  "  ```", f"  {command}", "  ```", ""]
    lines.append("")
    return "\n".join(lines)


def write_report(
    result_paths: Sequence[Path], *, out_dir: Path, run_dirs: Sequence[Path] = (), encoder_order: Sequence[str] = (),
    across_runs: bool = False,
) -> dict[str, Any]:
    """Write report.md, report.json and the plots into out_dir; return the report.json content."""
    records = load_results(list(result_paths))
    if not records:
        raise ValueError(f"no result files found in {[str(p) for p in result_paths]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(records, encoder_order, across_runs=across_runs)
    warnings = table_names(records)[1]
    runs = [read_run(Path(d)) for d in run_dirs]
    plots: list[str] = []
    for dataset, t in tables.items():
        plots.append(plot_bars(t, dataset, out_dir / f"bars-{slug(dataset)}.png").name)
        if (p := plot_fewshot(t, dataset, out_dir / f"fewshot-{slug(dataset)}.png")) is not None:
            plots.append(p.name)
    if (p := plot_losses(runs, out_dir / "losses.png")) is not None:
        plots.append(p.name)
    report = {
        "datasets": {
            ds: {
                "encoders": t["encoders"], "columns": t["columns"], **t["info"], "notes": t["notes"],
                "table": {e: {c: cell.__dict__ for c, cell in t["cells"][e].items()} for e in t["encoders"]},
            }
            for ds, t in tables.items()
        },
        "runs": [{k: r[k] for k in ("name", "path", "loss_key")} | {
            "steps": r["steps"][-1] if r["steps"] else 0,
            "first_loss": r["losses"][0] if r["losses"] else None,
            "last_loss": r["losses"][-1] if r["losses"] else None,
        } for r in runs],
        "plots": plots,
        "results": [r["_file"] for r in records],
        "warnings": warnings,
    }
    report = _json_ready(report)
    write_json_atomic(report, out_dir / "report.json")
    md = _markdown(tables, runs, plots, across_runs=across_runs, warnings=warnings)
    tmp = out_dir / ".report.md.tmp"
    tmp.write_text(md)
    tmp.replace(out_dir / "report.md")
    return report


def _json_ready(obj: Any) -> Any:
    """NaN/inf are not JSON: a diverged number shows as null instead of breaking the file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    return obj
