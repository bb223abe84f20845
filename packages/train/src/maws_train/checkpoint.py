"""Checkpoints: the exported encoder (release format) and the full, resumable training state.

Exported encoder (`export_encoder` / `load_encoder`), the hand-off to maws_eval:
    DIR/encoder.safetensors   timm VisionTransformer state dict, no head keys
    DIR/encoder.json          {"timm_name", "kwargs", "variant", "img_size"}, written last
`timm.create_model(info["timm_name"], **info["kwargs"], num_classes=0, checkpoint_path=".../encoder.safetensors")`
builds and loads it without maws_train.

Training state (`save_state` / `load_state`), one directory per kept step:
    RUN/ckpt/step_000123/model.safetensors   full (unsharded) model state dict
    RUN/ckpt/step_000123/optim.safetensors   AdamW tensors as "<param fqn>/<exp_avg|exp_avg_sq|step>"
    RUN/ckpt/step_000123/state.json          step, param_groups (by fqn), loader states per rank, config; written last
Under FSDP2 (`save_state_shard`) nothing is gathered: every rank writes the shards it holds,
    RUN/ckpt/step_000123/model-00003-of-00008.safetensors   rank 3's dim-0 shard of every parameter
    RUN/ckpt/step_000123/optim-00003-of-00008.safetensors   rank 3's AdamW shards (same keys as above)
and state.json records "shards": 8. A 6.5B run then writes 1/8 of its 78 GB of weights + AdamW state
per rank, in parallel, instead of gathering all of it into rank 0's memory. Shards are loaded by the
rank that wrote them (a resume needs the same number of processes anyway: the loader's plan depends on
it); `read_state_dir` concatenates them into the full state (WSP --init, inspection).
The directory is assembled under RUN/ckpt/.tmp-step_000123 and renamed into place, so a step_* directory
is complete or absent; a run killed mid-write leaves only a .tmp-* that the next save removes. Nothing
here uses pickle: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from maws_train.models.vit import VARIANTS, build_encoder, encoder_kwargs, get_variant

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_INFO = "encoder.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
# Prefixes that wrappers add in front of the timm key names: DDP, torch.compile, our MAE/WSP modules.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "encoder.")


class CheckpointError(ValueError):
    """A file that is missing, is not a checkpoint, or does not fit the requested architecture."""


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Exported encoder
# ---------------------------------------------------------------------------------------------------


def export_encoder(encoder: VisionTransformer, out_dir: Path | str, *, variant: str, img_size: int) -> Path:
    """Write `out_dir/encoder.safetensors` + `out_dir/encoder.json` (json last); returns the weights path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    weights = out / ENCODER_WEIGHTS
    _save_safetensors_atomic(state, weights, metadata={"format": "pt", "variant": variant})
    info = {
        "timm_name": get_variant(variant).timm_name,
        "kwargs": encoder_kwargs(variant, img_size=img_size),
        "variant": variant,
        "img_size": img_size,
    }
    write_json_atomic(out / ENCODER_INFO, info)
    return weights


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch checkpoint (weights_only, no arbitrary pickle).

    Accepts a bare state dict or one nested under "model" / "state_dict" / "model_state" (MAE and
    timm training scripts save them that way). MAE's scripts also save `"args": argparse.Namespace`;
    that one class is allow-listed for the unpickler, nothing else is.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory; expected a .safetensors or .pth file")
    try:
        if p.suffix == ".safetensors":
            obj: Any = load_file(str(p), device="cpu")
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):  # scoped add_safe_globals
                obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's unpickler raises arbitrary types (KeyError, UnpicklingError, ...) on junk
        raise CheckpointError(f"{p} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} does not hold a state dict of tensors")
    return dict(obj)


def encoder_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Reduce any of our or timm's state dicts to timm encoder keys.

    Strips wrapper prefixes (module., _orig_mod., encoder.) and drops everything that is not part of a
    headless VisionTransformer (MAE decoder, mask token, classifier heads). `fc_norm.*` is kept only
    when there is no `norm.*`: that is MAE's fine-tuned global-pool layout (see `load_encoder`).
    Returns (encoder state, dropped keys).
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        k = key
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k, changed = k[len(prefix) :], True
        if k.startswith(("decoder", "mask_token", "head.")) or k == "head":
            dropped.append(key)
        else:
            out[k] = value
    if "norm.weight" in out:  # a final norm and an fc_norm: the usual (token-pooled) encoder; fc_norm is head-side
        dropped += [k for k in out if k.startswith("fc_norm.")]
        out = {k: v for k, v in out.items() if not k.startswith("fc_norm.")}
    return out, dropped


def infer_architecture(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(variant, img_size) from the shapes of a timm ViT state dict; heads are not visible in shapes,
    so the variant is the VARIANTS entry matching width, patch size, depth and MLP width."""
    try:
        width, _, patch, _ = state["patch_embed.proj.weight"].shape
        tokens = state["pos_embed"].shape[1]
        mlp = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError):
        raise CheckpointError(
            "cannot infer the ViT architecture: expected timm keys patch_embed.proj.weight, pos_embed, "
            "blocks.0.mlp.fc1.weight"
        ) from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = round((tokens - 1) ** 0.5)
    if grid * grid != tokens - 1:
        raise CheckpointError(f"pos_embed has {tokens} tokens; expected 1 cls + a square patch grid "
                              "(rectangular grids are not supported)")
    for name, v in VARIANTS.items():
        if (v.embed_dim, v.patch_size, v.depth, v.mlp_dim) == (width, patch, depth, mlp):
            return name, grid * patch
    raise CheckpointError(
        f"no known variant has width {width}, patch {patch}, depth {depth}, mlp {mlp}; known: {', '.join(VARIANTS)}"
    )


def _locate(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """Resolve a run/export directory or a weights file to (weights file, encoder.json content or None)."""
    if path.is_dir():
        path = path / ENCODER_WEIGHTS
        if not path.exists():
            raise CheckpointError(f"no {ENCODER_WEIGHTS} in {path.parent} (is the run finished?)")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    info_path = path.with_name(ENCODER_INFO)
    if path.name == ENCODER_WEIGHTS and info_path.exists():
        try:
            return path, json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{info_path} is not valid JSON: {e}") from None
    return path, None


def fit_pos_embed(state: dict[str, torch.Tensor], model: VisionTransformer, *, source: str) -> str | None:
    """Resample `state["pos_embed"]` (in place) to `model`'s patch grid when they differ: an encoder
    trained at one size (MAWS's 512 px fine-tunes, a 32 px test run) loaded at another. Bicubic, with
    the cls row kept as is (timm's `resample_abs_pos_embed`, what timm does for pretrained weights).
    Returns a note saying what was done, or None when nothing was; a file whose patch grid is not square
    is a CheckpointError naming `source`."""
    pe, own = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if pe is None or own is None or pe.shape == own.shape or pe.ndim != 3 or pe.shape[-1] != own.shape[-1]:
        return None  # same grid, or not a resampling case (load_into names the mismatch)
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    new = list(model.patch_embed.grid_size)
    old = math.isqrt(max(0, pe.shape[1] - prefix))
    if old * old != pe.shape[1] - prefix:  # a rectangular grid: its shape is not in the file, so no guessing
        raise CheckpointError(
            f"{source}: pos_embed has {pe.shape[1]} tokens, not {prefix} prefix + a square patch grid, so it "
            f"cannot be resampled to this model's {new[0]}x{new[1]} grid; load it at the size it was trained at"
        )
    state["pos_embed"] = resample_abs_pos_embed(pe, new_size=new, old_size=[old, old], num_prefix_tokens=prefix)
    p = model.patch_embed.patch_size[0]
    return (f"{source}: pos_embed resampled (bicubic) from a {old}x{old} to a {new[0]}x{new[1]} patch grid, "
            f"i.e. from {old * p} px to {new[0] * p} px")


def load_encoder(
    path: Path | str, *, variant: str | None = None, img_size: int | None = None
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Build and load a headless encoder from an export dir, encoder.safetensors, or a timm/MAWS checkpoint.

    With our export the architecture comes from encoder.json. For other files it is `variant` /
    `img_size` when given, else inferred from tensor shapes (`infer_architecture`). Loading is strict
    on encoder keys; head/decoder keys in the file are dropped and listed in info["dropped_keys"].
    Adjustments, each listed in info["notes"]:
      - `img_size` other than the file's: pos_embed resampled to the new grid (`fit_pos_embed`);
      - MAE's fine-tuned global-pool layout (`fc_norm.*`, no `norm.*`): built as timm's
        `global_pool="avg"` ViT, whose `fc_norm` after the mean of the patch tokens is exactly MAE's.
    info["native_img_size"] is the size the file was trained at.
    Raises CheckpointError for a missing file, a non-checkpoint, or a wrong architecture.
    """
    weights, meta = _locate(Path(path))
    state, dropped = encoder_state(read_state_dict(weights))
    notes: list[str] = []
    overrides: dict[str, Any] = {}
    if "fc_norm.weight" in state:
        overrides["global_pool"] = "avg"
        notes.append(f"{weights}: MAE global-pool layout (fc_norm.*, no norm.*): loaded as timm global_pool='avg' "
                     "(features = fc_norm of the mean patch token, as MAE's fine-tuned model)")
    native = int(meta["img_size"]) if meta is not None else None
    variant = variant or (meta["variant"] if meta is not None else None)
    if variant is None or native is None:
        try:
            guessed_variant, guessed_size = infer_architecture(state)
        except CheckpointError as e:
            raise CheckpointError(f"{weights}: {e}") from None
        variant, native = variant or guessed_variant, native or guessed_size
    img_size = img_size or native
    try:
        encoder = build_encoder(variant, img_size=img_size, **overrides)
    except ValueError as e:  # img_size not a multiple of the patch size
        raise CheckpointError(f"{weights}: {e}") from None
    if (note := fit_pos_embed(state, encoder, source=str(weights))) is not None:
        notes.append(note)
    load_into(encoder, state, source=str(weights), strict=True)
    info = {
        "timm_name": get_variant(variant).timm_name,
        "kwargs": encoder_kwargs(variant, img_size=img_size, **overrides),
        "variant": variant,
        "img_size": img_size,
        "native_img_size": native,
        "path": str(weights),
        "dropped_keys": dropped,
        "notes": notes,
    }
    return encoder, info


def load_into(module: nn.Module, state: dict[str, torch.Tensor], *, source: str, strict: bool) -> dict[str, list[str]]:
    """Copy `state` into `module`; shape mismatches are always an error, missing keys only when strict.

    Returns {"loaded": [...], "missing": [...], "unexpected": [...]} (module key names).
    """
    own = module.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or (strict and (missing or unexpected)) or not set(state) & set(own):
        lines = mismatched[:5] + [f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in unexpected[:5]]
        raise CheckpointError(
            f"{source} does not match the model architecture "
            f"({len(mismatched)} shape mismatches, {len(missing)} missing, {len(unexpected)} unexpected keys): "
            + "; ".join(lines)
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return {"loaded": sorted(set(state) & set(own)), "missing": missing, "unexpected": unexpected}


def read_init_encoder(path: Path | str) -> tuple[dict[str, torch.Tensor], list[str], Path]:
    """Encoder tensors for WSP `--init` from an MAE run dir, its encoder.safetensors, a ckpt step dir
    (full or sharded), or a timm/MAWS file. Returns (timm-keyed encoder state, dropped keys, file read)."""
    p = Path(path)
    if p.is_dir() and not (p / ENCODER_WEIGHTS).exists() and (p / "state.json").exists():
        state, dropped = encoder_state(read_state_dir(p))
        return state, dropped, p
    weights, _ = _locate(p)
    state, dropped = encoder_state(read_state_dict(weights))
    return state, dropped, weights


# ---------------------------------------------------------------------------------------------------
# Resumable training state
# ---------------------------------------------------------------------------------------------------


def _flatten_optim(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {f"{fqn}/{name}": t for fqn, st in osd["state"].items() for name, t in st.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, groups


def _unflatten_optim(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        fqn, name = key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def _begin(run_dir: Path, step: int) -> Path:
    """The temp directory a checkpoint of `step` is assembled in (stale ones of killed saves removed)."""
    root = run_dir / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step_{step:06d}"
    tmp.mkdir()
    return tmp


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk: a rename is durable only after its directory is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some network filesystems refuse fsync on a directory: best effort there
            raise
    finally:
        os.close(fd)


def _remove(step_dir: Path) -> None:
    """Delete a checkpoint without ever leaving a partly deleted step_* that looks complete: hide it under
    a .tmp- name first (the next save clears those), then delete."""
    hidden = step_dir.with_name(f".tmp-{step_dir.name}.old")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(step_dir, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _finish(run_dir: Path, tmp: Path, *, step: int, meta: dict[str, Any], keep: int) -> Path:
    """state.json last, fsync, then the rename that makes the checkpoint visible; keep the newest `keep`."""
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1) + "\n")
    _fsync(tmp / "state.json")
    _fsync(tmp)
    final = run_dir / "ckpt" / f"step_{step:06d}"
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        _remove(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    for old in list_states(run_dir)[:-keep]:
        _remove(old)
    return final


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    _fsync(path)


def save_state(
    run_dir: Path,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write RUN/ckpt/step_{step:06d} atomically (call on the main rank only); keep the newest `keep`."""
    tmp = _begin(run_dir, step)
    _save(model_state, tmp / "model.safetensors")
    tensors, groups = _flatten_optim(optim_state)
    _save(tensors, tmp / "optim.safetensors")
    return _finish(run_dir, tmp, step=step, meta={"param_groups": groups, **meta}, keep=keep)


def shard_file(kind: str, rank: int, world_size: int) -> str:
    return f"{kind}-{rank:05d}-of-{world_size:05d}.safetensors"


def save_state_shard(
    run_dir: Path,
    *,
    step: int,
    rank: int,
    world_size: int,
    model_shard: dict[str, torch.Tensor],
    optim_shard: dict[str, Any],
    meta: dict[str, Any],
    barrier: Callable[[], None],
    keep: int = 2,
) -> Path:
    """Every rank calls this with the shards it holds (FSDP2 `to_local()` tensors, keyed by FQN):
    rank 0 prepares the temp directory, every rank writes its two files, rank 0 writes state.json and
    renames. `barrier` separates the three phases (the run dir must be on a filesystem all ranks share)."""
    tmp = run_dir / "ckpt" / f".tmp-step_{step:06d}"
    if rank == 0:
        _begin(run_dir, step)
    barrier()
    _save(model_shard, tmp / shard_file("model", rank, world_size))
    tensors, groups = _flatten_optim(optim_shard)
    _save(tensors, tmp / shard_file("optim", rank, world_size))
    barrier()
    final = run_dir / "ckpt" / f"step_{step:06d}"
    if rank == 0:
        final = _finish(run_dir, tmp, step=step, meta={"param_groups": groups, "shards": world_size, **meta},
                        keep=keep)
    barrier()
    return final


def list_states(run_dir: Path) -> list[Path]:
    """Complete checkpoint dirs of a run, oldest first."""
    root = run_dir / "ckpt"
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and _STEP_DIR.match(d.name) and (d / "state.json").exists()]
    return sorted(dirs, key=lambda d: int(_STEP_DIR.match(d.name).group(1)))  # type: ignore[union-attr]


def load_state(ckpt_dir: Path, *, rank: int = 0, world_size: int | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state dict keyed by fqn, meta incl. "step") from one step directory.

    For a sharded checkpoint (meta["shards"] = N) the tensors are rank `rank`'s shards, to be loaded
    into a model sharded the same way (`distributed.load_train_state(..., sharded=True)`)."""
    if not (ckpt_dir / "state.json").exists():
        raise CheckpointError(f"{ckpt_dir} is not a complete training checkpoint (no state.json)")
    meta = json.loads((ckpt_dir / "state.json").read_text())
    shards = meta.get("shards")
    if shards is not None and world_size is not None and shards != world_size:
        raise CheckpointError(f"{ckpt_dir} holds {shards} shards (an FSDP2 run on {shards} processes); this run has "
                              f"{world_size}: resume with the same number of processes")
    # Every rank checks every file, so that a missing shard stops all ranks alike (none waits in a collective).
    expected = ["model.safetensors", "optim.safetensors"] if shards is None else [
        shard_file(kind, r, shards) for r in range(shards) for kind in ("model", "optim")]
    missing = [name for name in expected if not (ckpt_dir / name).exists()]
    if missing:
        raise CheckpointError(f"{ckpt_dir} is not a complete training checkpoint (no {', '.join(missing)})")
    names = expected if shards is None else [shard_file("model", rank, shards), shard_file("optim", rank, shards)]
    model_state = load_file(str(ckpt_dir / names[0]))
    optim_state = _unflatten_optim(load_file(str(ckpt_dir / names[1])), meta.pop("param_groups"))
    return model_state, optim_state, meta


def read_state_dir(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The full model state of a step directory; a sharded one's dim-0 shards concatenated in rank order
    (FSDP2 shards every parameter on dim 0 as torch.chunk does)."""
    meta_path = ckpt_dir / "state.json"
    shards = json.loads(meta_path.read_text()).get("shards") if meta_path.exists() else None
    if shards is None:
        return read_state_dict(ckpt_dir / "model.safetensors")
    parts = [read_state_dict(ckpt_dir / shard_file("model", r, shards)) for r in range(shards)]
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
