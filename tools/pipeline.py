"""The whole MAWS pipeline in one command: captions -> shards -> MAE -> WSP (from MAE, from scratch)
-> eval of all three and a random-init floor -> report.

    uv run python tools/pipeline.py --captions ../shared/data/instagram/captions.parquet \
        --eval-data ../shared/data/imagenette --preset tiny --out runs/pipeline

Stages (each is one user-visible command, run as a subprocess so what runs here is what a user
would type; the exact command lines are printed and stored in OUT/pipeline.json):
  captions     OUT/captions.parquet        seeded sample of `rows` rows, image paths made absolute
                                           (only when the preset limits rows)
  build        OUT/build/                  maws-data build
  mae          OUT/runs/mae/               maws-train mae
  mae_wsp      OUT/runs/mae_wsp/           maws-train wsp --init OUT/runs/mae   (MAE->WSP, MAWS)
  wsp          OUT/runs/wsp/               maws-train wsp                       (WSP from scratch)
  random_init  OUT/runs/random_init/       same architecture, timm init, never trained (the floor)
  eval         OUT/results/*.json          maws-eval all random-init=… MAE=… WSP=… MAE->WSP=…
  report       OUT/report/report.md        maws-eval report
A stage is skipped when its output is complete (manifest.json, encoder.json, the stage's marker in
OUT/stages/), so re-running the same command is a no-op and an interrupted run continues where it
stopped (training itself resumes from its last checkpoint).

Presets: `test` (a smoke run, ~1 min on 2 cores), `tiny` (the quickstart and the test suite, 2-3 min), `cpu` (the
experiment: ~7 min on 2 idle cores per seed), `cpu_long` (the same with 2.5x the training steps, 16-19 min per
seed), `gpu_s16` / `gpu_b16` (one GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ENCODER_ORDER = ("random-init", "MAE", "WSP", "MAE->WSP")


@dataclass(frozen=True)
class PipelinePreset:
    """Sizes of every stage. Training fields map onto `maws-train --set` overrides."""

    rows: int = 0  # captions rows to use (seeded sample); 0 = all
    image_size: int = 64  # stored shorter side of the shard images
    min_count: int = 5  # vocabulary: synsets with at least this many images
    max_classes: int = 0  # 0 = no limit
    mae_preset: str = "mu_mae"
    wsp_preset: str = "mu_wsp"
    img_size: int = 32  # encoder input size (MAE and WSP must agree for --init)
    batch_size: int = 16
    mae_steps: int = 40
    wsp_steps: int = 40
    train_sets: tuple[str, ...] = ()  # extra --set overrides for both trainings
    eval_train_per_class: int = 0  # 0 = all
    eval_val_per_class: int = 0
    eval_batch_size: int = 64
    protocols: tuple[str, ...] = ("linear", "knn", "fewshot", "finetune")
    eval_sets: tuple[str, ...] = ()  # extra maws-eval --set overrides
    processes: int = 2
    seed: int = 0


PRESETS: dict[str, PipelinePreset] = {
    # a smoke run in about a minute; numbers are meaningless, every stage runs for real
    "test": PipelinePreset(
        rows=120, image_size=40, min_count=3, max_classes=20, mae_steps=6, wsp_steps=6, batch_size=8,
        eval_train_per_class=10, eval_val_per_class=4, eval_batch_size=50,
        eval_sets=("fewshot.shots=1,5", "fewshot.seeds=0,1,2", "linear.l2_grid=0.001,0.1", "linear.max_iter=50",
                   "finetune.steps=4", "finetune.batch_size=8"),
    ),
    # the quickstart and the test suite: 2 CPU cores, 2-3 minutes
    "tiny": PipelinePreset(
        rows=0, image_size=64, min_count=5, mae_steps=150, wsp_steps=150, batch_size=32,
        eval_train_per_class=60, eval_val_per_class=40,
        eval_sets=("finetune.steps=60", "finetune.batch_size=32"),
    ),
    # the CPU experiment: ~7 min per seed on 2 idle cores, ~20 min when shared (docs/eval.md has its table)
    "cpu": PipelinePreset(
        rows=0, image_size=96, min_count=5, img_size=64, batch_size=64, mae_steps=1600, wsp_steps=1200,
        eval_train_per_class=200, eval_val_per_class=100, eval_batch_size=100,
        protocols=("linear", "knn", "fewshot"), eval_sets=("linear.seeds=0,1,2",),
    ),
    # the same experiment with 2.5x the training steps of "cpu" (16-19 min per seed on 2 cores)
    "cpu_long": PipelinePreset(
        rows=0, image_size=96, min_count=5, img_size=64, batch_size=64, mae_steps=4000, wsp_steps=3000,
        eval_train_per_class=200, eval_val_per_class=100, eval_batch_size=100,
        protocols=("linear", "knn", "fewshot"), eval_sets=("linear.seeds=0,1,2",),
    ),
    # one GPU: ViT-S/16 and ViT-B/16 at 224 px on the whole caption table and full Imagenette
    "gpu_s16": PipelinePreset(
        image_size=256, mae_preset="b16_mae", wsp_preset="b16_wsp", img_size=224, batch_size=256,
        mae_steps=2000, wsp_steps=1000, processes=8, eval_batch_size=256,
        train_sets=("model.variant=s16", "data.num_workers=8", "run.compile=false", "run.parallel=ddp"),
        eval_sets=("finetune.steps=1000", "finetune.batch_size=128", "data.num_workers=8"),
    ),
    "gpu_b16": PipelinePreset(
        image_size=256, mae_preset="b16_mae", wsp_preset="b16_wsp", img_size=224, batch_size=256,
        mae_steps=4000, wsp_steps=2000, processes=8, eval_batch_size=256,
        train_sets=("data.num_workers=8", "run.parallel=ddp"),
        eval_sets=("finetune.steps=2000", "finetune.batch_size=128", "data.num_workers=8"),
    ),
}


@dataclass
class Pipeline:
    captions: Path
    eval_data: Path
    out: Path
    preset_name: str
    preset: PipelinePreset
    log: list[dict] = field(default_factory=list)
    dirty: bool = False  # a stage ran in this invocation: every later stage must run too

    # -- plumbing -------------------------------------------------------------------------------

    def tool(self, name: str) -> str:
        """The console script installed beside this interpreter (the workspace's .venv/bin)."""
        path = Path(sys.executable).parent / name
        if not path.exists():
            raise SystemExit(f"{name} not found beside {sys.executable}: run from the workspace (`uv run python ...`)")
        return str(path)

    def marker(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def done(self, stage: str, *outputs: Path) -> bool:
        """Skippable: marker and outputs present, and nothing upstream was redone in this invocation."""
        return not self.dirty and self.marker(stage).is_file() and all(p.exists() for p in outputs)

    def run_stage(self, stage: str, cmd: list[str], *, outputs: list[Path]) -> None:
        if self.done(stage, *outputs):
            recorded = json.loads(self.marker(stage).read_text())["command"]
            note = "" if recorded == cmd else " (NOTE: recorded with a different command; delete it to redo)"
            print(f"[pipeline] {stage}: done, skipped{note}", flush=True)
            self.log.append({"stage": stage, "command": shlex.join(cmd), "skipped": True})
            return
        print(f"[pipeline] {stage}: {shlex.join(cmd)}", flush=True)
        self.dirty = True
        self.marker(stage).unlink(missing_ok=True)
        start = time.monotonic()
        env = {**os.environ, "NLTK_DATA": os.environ.get("NLTK_DATA", str(default_nltk_data()))}
        result = subprocess.run(cmd, env=env, check=False)  # exit code reported below with the stage name
        if result.returncode != 0:
            raise SystemExit(f"[pipeline] stage {stage} failed (exit {result.returncode}): {shlex.join(cmd)}")
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise SystemExit(f"[pipeline] stage {stage} finished but did not write {missing}")
        seconds = round(time.monotonic() - start, 1)
        self.write_marker(stage, cmd, seconds)
        self.log.append({"stage": stage, "command": shlex.join(cmd), "seconds": seconds})

    def write_marker(self, stage: str, cmd: list[str], seconds: float) -> None:
        path = self.marker(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"command": cmd, "seconds": seconds}, indent=2) + "\n")
        os.replace(tmp, path)

    # -- stages ---------------------------------------------------------------------------------

    def captions_table(self) -> Path:
        """The preset's seeded row sample, image paths absolute so the table can live anywhere."""
        if not self.preset.rows:
            return self.captions
        out = self.out / "captions.parquet"
        if out.is_file():
            print("[pipeline] captions: done, skipped", flush=True)
            return out
        self.dirty = True
        import polars as pl

        df = pl.read_parquet(self.captions)
        if "image" in df.columns and df.schema["image"] == pl.String:
            base = str(self.captions.resolve().parent) + os.sep
            df = df.with_columns(
                pl.when(pl.col("image").str.contains(r"^(/|[a-z]+://)"))
                .then(pl.col("image")).otherwise(pl.lit(base) + pl.col("image")).alias("image")
            )
        # a seeded sample, not the head: the table is sorted by search category
        df = df.sample(n=min(self.preset.rows, df.height), seed=self.preset.seed, shuffle=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.parquet")
        df.write_parquet(tmp)
        os.replace(tmp, out)
        print(f"[pipeline] captions: {df.height} of the table's rows -> {out}", flush=True)
        return out

    def build(self, captions: Path) -> Path:
        p, out = self.preset, self.out / "build"
        cmd = [self.tool("maws-data"), "build", "--source", str(captions), "--out", str(out),
               "--image-size", str(p.image_size), "--min-count", str(p.min_count), "--processes", str(p.processes),
               "--no-progress"]
        if p.max_classes:
            cmd += ["--max-classes", str(p.max_classes)]
        self.run_stage("build", cmd, outputs=[out / "manifest.json"])
        return out

    def train_sets(self, steps: int) -> list[str]:
        p = self.preset
        sets = [f"model.img_size={p.img_size}", f"data.batch_size={p.batch_size}", f"run.steps={steps}",
                f"run.seed={p.seed}", *p.train_sets]
        return [arg for s in sets for arg in ("--set", s)]

    def train(self, stage: str, kind: str, shards: Path, *, init: Path | None = None) -> Path:
        p, out = self.preset, self.out / "runs" / stage
        preset = p.mae_preset if kind == "mae" else p.wsp_preset
        steps = p.mae_steps if kind == "mae" else p.wsp_steps
        cmd = [self.tool("maws-train"), kind, preset, "--shards", str(shards), "--out", str(out),
               *self.train_sets(steps)]
        if init is not None:
            cmd += ["--init", str(init)]
        self.run_stage(stage, cmd, outputs=[out / "encoder.json", out / "encoder.safetensors"])
        return out

    def random_init(self, like: Path) -> Path:
        """An untrained encoder of the trained runs' architecture: the floor every method must beat.

        In-process (there is no CLI for "export an untrained model"); seeded, so re-runs match.
        """
        out = self.out / "runs" / "random_init"
        info = json.loads((like / "encoder.json").read_text())
        desc = ["export_encoder(build_encoder(...))", f"variant={info['variant']}", f"img_size={info['img_size']}",
                f"seed={self.preset.seed}", str(out)]
        if self.done("random_init", out / "encoder.json"):
            print("[pipeline] random_init: done, skipped", flush=True)
            return out
        self.dirty = True
        import torch
        from maws_train.checkpoint import export_encoder
        from maws_train.models import build_encoder

        torch.manual_seed(self.preset.seed)
        encoder = build_encoder(info["variant"], img_size=int(info["img_size"]))
        export_encoder(encoder, out, variant=info["variant"], img_size=int(info["img_size"]))
        self.write_marker("random_init", desc, 0.0)
        self.log.append({"stage": "random_init", "command": " ".join(desc)})
        print(f"[pipeline] random_init: {out}", flush=True)
        return out

    def evaluate(self, encoders: dict[str, Path]) -> Path:
        p, out = self.preset, self.out / "results"
        sets = [f"data.max_train_per_class={p.eval_train_per_class}", f"data.max_val_per_class={p.eval_val_per_class}",
                f"data.batch_size={p.eval_batch_size}", *p.eval_sets]
        cmd = [self.tool("maws-eval"), "all", *[f"{name}={path}" for name, path in encoders.items()],
               "--data", str(self.eval_data), "--out", str(out), "--cache-dir", str(self.out / "feature-cache"),
               "--protocols", ",".join(p.protocols), *[a for s in sets for a in ("--set", s)]]
        self.run_stage("eval", cmd, outputs=[out])
        return out

    def report(self, results: Path, runs: list[Path]) -> Path:
        out = self.out / "report"
        cmd = [self.tool("maws-eval"), "report", str(results), "--out", str(out), "--order", ",".join(ENCODER_ORDER),
               *[a for r in runs for a in ("--runs", str(r))]]
        self.run_stage("report", cmd, outputs=[out / "report.md", out / "report.json"])
        return out / "report.md"

    def run(self) -> Path:
        start = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        captions = self.captions_table()
        shards = self.build(captions)
        mae = self.train("mae", "mae", shards)
        mae_wsp = self.train("mae_wsp", "wsp", shards, init=mae)
        wsp = self.train("wsp", "wsp", shards)
        floor = self.random_init(like=mae)
        results = self.evaluate({"random-init": floor, "MAE": mae, "WSP": wsp, "MAE->WSP": mae_wsp})
        report = self.report(results, [mae, wsp, mae_wsp])
        summary = {"preset": self.preset_name, "config": dataclasses.asdict(self.preset),
                   "captions": str(self.captions), "eval_data": str(self.eval_data),
                   "command": shlex.join([Path(sys.executable).name, *sys.argv]), "stages": self.log,
                   "seconds": round(time.monotonic() - start, 1)}
        tmp = self.out / "pipeline.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.out / "pipeline.json")
        print(f"[pipeline] report: {report}", flush=True)
        return report


def default_nltk_data() -> Path:
    """WordNet for the build: ../shared/data/nltk_data beside the checkout when present."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nltk_data"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--captions", type=Path, required=True, help="captions table (parquet) for MAE and WSP")
    ap.add_argument("--eval-data", type=Path, required=True, help="ImageFolder tree with train/ and val/")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--out", type=Path, default=Path("runs/pipeline"))
    ap.add_argument("--seed", type=int, default=None,
                    help="training seed (MAE, WSP, random init, row sample); default: the preset's (0). "
                         "Evaluation seeds are the protocols' own, so runs with other --seed differ in training only")
    args = ap.parse_args(argv)
    for path in (args.captions, args.eval_data):
        if not path.exists():
            raise SystemExit(f"{path} does not exist")
    preset = PRESETS[args.preset]
    if args.seed is not None:
        preset = dataclasses.replace(preset, seed=args.seed)
    return Pipeline(captions=args.captions, eval_data=args.eval_data, out=args.out, preset_name=args.preset,
                    preset=preset).run()


if __name__ == "__main__":
    main()
