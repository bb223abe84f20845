"""`maws-eval`: score encoders with linear / knn / fewshot / finetune, and write the report.

    maws-eval linear  mae=runs/mae/ wsp=runs/wsp/ --data ../shared/data/imagenette --out results/
    maws-eval all     runs/mae runs/wsp --data DATA --out results/ --protocols linear,knn,fewshot
    maws-eval fewshot maws_b16.pt --data DATA --out results/ --set fewshot.shots=1,5,10,25
    maws-eval report  results/ --runs runs/mae --runs runs/wsp --out report/

An ENCODER is `NAME=PATH` or `PATH`: an exported run dir (encoder.safetensors + encoder.json), an
encoder.safetensors, or a timm/MAWS checkpoint file. Features are cached in --cache-dir
(default OUT/../feature-cache) keyed by the encoder's bytes, the chosen images and preprocessing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from maws_eval.config import PROTOCOLS, DataConfig, override

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MAWS evaluation and report.")

EncodersArg = Annotated[list[str], typer.Argument(help="encoders: NAME=PATH or PATH (run dir or checkpoint file)")]
DataOpt = Annotated[Path, typer.Option("--data", help="eval dataset: ImageFolder tree (train/, val/) or a "
                                                      "maws-data build dir (labeled shards)")]
ValOpt = Annotated[Path | None, typer.Option("--val-data", help="shards only: a second build as val "
                                                                   "(default: data.val_fraction of --data by key hash)")]
OutOpt = Annotated[Path, typer.Option("--out", help="directory for the result JSON files")]
CacheOpt = Annotated[Path | None, typer.Option("--cache-dir", help="feature cache (default: OUT/../feature-cache)")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="always re-extract features")]
SetOpt = Annotated[list[str], typer.Option("--set", help="override: section.field=value, section in "
                                                          "data|linear|knn|fewshot|finetune (repeatable)")]
NameOpt = Annotated[str | None, typer.Option("--dataset-name", help="dataset id in results (default: folder name)")]


def _configs(sets: list[str]):
    by_section: dict[str, list[str]] = {}
    for item in sets:
        section, dot, rest = item.partition(".")
        if not dot or section not in ("data", *PROTOCOLS):
            raise typer.BadParameter(f"--set {item!r}: expected section.field=value with section in "
                                     f"data, {', '.join(PROTOCOLS)}")
        by_section.setdefault(section, []).append(rest)
    from maws_eval.evaluate import ProtocolConfigs

    configs = ProtocolConfigs()
    data = override(DataConfig(), by_section.pop("data", []))
    for section, items in by_section.items():
        configs = dataclasses.replace(configs, **{section: override(getattr(configs, section), items)})
    return configs, data


def _run(protocols: list[str], encoders: list[str], data: Path, out: Path, cache_dir: Path | None, no_cache: bool,
         sets: list[str], dataset_name: str | None, val_data: Path | None) -> None:
    # imported here so `maws-eval report` does not pay for torch/timm/maws_train imports
    from maws_eval.evaluate import evaluate, parse_encoder

    try:
        configs, data_cfg = _configs(sets)
        refs = [parse_encoder(e) for e in encoders]
        cache = None if no_cache else (cache_dir or out.parent / "feature-cache")
        paths = evaluate(refs, data, protocols=protocols, out_dir=out, configs=configs, data_cfg=data_cfg,
                         cache_dir=cache, dataset_id=dataset_name, val_dataset=val_data)
    except (ValueError, FileNotFoundError, KeyError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    for p in paths:
        typer.echo(str(p))


def _protocol_command(name: str):
    def command(encoders: EncodersArg, data: DataOpt, out: OutOpt, cache_dir: CacheOpt = None,
                no_cache: NoCacheOpt = False, set_: SetOpt = [], dataset_name: NameOpt = None,  # noqa: B006
                val_data: ValOpt = None) -> None:
        _run([name], encoders, data, out, cache_dir, no_cache, set_, dataset_name, val_data)

    command.__doc__ = {
        "linear": "Linear probe: logistic regression on frozen features, L2 chosen on a train holdout.",
        "knn": "Weighted kNN on frozen features (cosine, k=20, T=0.07, as DINO).",
        "fewshot": "Few-shot (1/5/10 shots x 5 seeds): closed-form L2 least squares (big_vision fewshot_lsr).",
        "finetune": "Full fine-tuning, small budget, layer-wise lr decay (MAE recipe scaled down).",
    }[name]
    return command


for _name in PROTOCOLS:
    app.command(name=_name)(_protocol_command(_name))


@app.command(name="all")
def all_(encoders: EncodersArg, data: DataOpt, out: OutOpt,
         protocols: Annotated[str, typer.Option(help="comma-separated protocols")] = ",".join(PROTOCOLS),
         cache_dir: CacheOpt = None, no_cache: NoCacheOpt = False, set_: SetOpt = [],  # noqa: B006
         dataset_name: NameOpt = None, val_data: ValOpt = None) -> None:
    """Several protocols in one go (features extracted once per encoder)."""
    names = [p.strip() for p in protocols.split(",") if p.strip()]
    if not names:
        typer.secho(f"error: --protocols {protocols!r} names no protocol; give a comma-separated list from "
                    f"{', '.join(PROTOCOLS)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    _run(names, encoders, data, out, cache_dir, no_cache, set_, dataset_name, val_data)


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="result JSON files or directories of them")],
    out: Annotated[Path, typer.Option("--out", help="report directory")],
    runs: Annotated[list[Path], typer.Option("--runs", help="training run dir with metrics.jsonl (repeatable)")] = [],  # noqa: B006
    order: Annotated[str | None, typer.Option(help="comma-separated encoder order for tables and plots")] = None,
    across_runs: Annotated[bool, typer.Option(help="combine results of the same encoder name from different files "
                                                   "(e.g. the pipeline with --seed 0/1/2): mean ± std over those "
                                                   "runs, instead of the last file winning")] = False,
) -> None:
    """report.md + report.json + PNG plots (bars per protocol, few-shot curves, loss curves)."""
    from maws_eval.report import write_report

    try:
        rep = write_report(results, out_dir=out, run_dirs=runs, encoder_order=order.split(",") if order else (),
                           across_runs=across_runs)
    except (ValueError, FileNotFoundError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    for warning in rep["warnings"]:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(str(out / "report.md"))
