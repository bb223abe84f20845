"""`maws-train`: `mae`, `wsp` and `presets`. Builds a config from a preset plus overrides and calls run().

    maws-train presets
    maws-train mae mu_mae --shards out/build --out runs/mae --set run.steps=100 --set optim.base_lr=1e-2
    maws-train wsp mu_wsp --shards out/build --out runs/wsp --init runs/mae
    torchrun --nproc_per_node=2 -m maws_train.cli mae mu_mae --shards out/build --out runs/mae2
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Annotated

import typer

from maws_train.checkpoint import CheckpointError
from maws_train.config import MAEConfig, WSPConfig, override, to_dict
from maws_train.metrics import NonFiniteLossError
from maws_train.presets import PRESETS, get_preset

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MAWS training: MAE pre-pretraining and WSP.")

SetOpt = Annotated[list[str], typer.Option("--set", help="override a config field: section.field=value (repeatable)")]
ShardsOpt = Annotated[str | None, typer.Option(help="maws-data build directory (= --set data.shards=...)")]
OutOpt = Annotated[str | None, typer.Option(help="run directory (= --set run.out=...)")]
ResumeOpt = Annotated[str | None, typer.Option(help="'auto' (default), 'never', or a checkpoint/run dir")]


def _build(preset: str, kind: type, *, shards: str | None, out: str | None, resume: str | None, sets: list[str]):
    cfg = get_preset(preset, kind=kind)
    cfg = override(cfg, sets)
    run = cfg.run
    if out is not None:
        run = dataclasses.replace(run, out=out)
    if resume is not None:
        run = dataclasses.replace(run, resume=resume)
    cfg = dataclasses.replace(cfg, run=run)
    if shards is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=shards))
    if not cfg.data.shards:
        raise typer.BadParameter("no shards: pass --shards DIR (a maws-data build) or --set data.shards=DIR")
    return cfg


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def mae(
    preset: Annotated[str, typer.Argument(help="an MAE preset (see `maws-train presets`)")],
    shards: ShardsOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a literal default
) -> None:
    """MAE pre-pretraining; writes RUN/encoder.safetensors (+ config.json, metrics.jsonl, ckpt/)."""
    from maws_train import mae as mae_loop

    try:
        cfg = _build(preset, MAEConfig, shards=shards, out=out, resume=resume, sets=set_)
        path = mae_loop.run(cfg)
    except (KeyError, ValueError, FileNotFoundError, NonFiniteLossError, CheckpointError) as e:
        _fail(e)
    typer.echo(str(path))


@app.command()
def wsp(
    preset: Annotated[str, typer.Argument(help="a WSP preset (see `maws-train presets`)")],
    shards: ShardsOpt = None,
    out: OutOpt = None,
    init: Annotated[str | None, typer.Option(help="MAE run dir / encoder.safetensors to start from")] = None,
    resume: ResumeOpt = None,
    set_: SetOpt = [],  # noqa: B006
) -> None:
    """Weakly supervised pretraining on the synset labels, optionally initialised from an MAE encoder."""
    from maws_train import wsp as wsp_loop

    try:
        cfg = _build(preset, WSPConfig, shards=shards, out=out, resume=resume, sets=set_)
        if init is not None:
            cfg = dataclasses.replace(cfg, init=init)
        path = wsp_loop.run(cfg)
    except (KeyError, ValueError, FileNotFoundError, NonFiniteLossError, CheckpointError) as e:
        _fail(e)
    typer.echo(str(path))


@app.command()
def presets(name: Annotated[str | None, typer.Argument(help="print this preset's full config")] = None) -> None:
    """List presets, or print one as JSON."""
    if name is not None:
        try:
            cfg = get_preset(name, kind=object)
        except KeyError as e:
            _fail(e)
        typer.echo(json.dumps(to_dict(cfg), indent=2))
        return
    for key, cfg in PRESETS.items():
        kind = "mae" if isinstance(cfg, MAEConfig) else "wsp"
        typer.echo(f"{key:12s} {kind}  variant={cfg.model.variant:7s} img={cfg.model.img_size:<4d} "
                   f"batch={cfg.data.batch_size:<5d} parallel={cfg.run.parallel}")



if __name__ == "__main__":
    sys.exit(app())
