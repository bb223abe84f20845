"""Checkpoints: the exported encoder (release format) and the full, resumable training state.

Exported encoder (`export_encoder` / `load_encoder`), the hand-off to maws_eval:
    DIR/encoder.safetensors   timm VisionTransformer state dict, no head keys
    DIR/encoder.json          {"timm_name", "kwargs", "variant", "img_size"}, written last
`timm.create_model(info["timm_name"], **info["kwargs"], num_classes=0, checkpoint_path=".../encoder.safetensors")`
builds and loads it without maws_train.

Training state (`save_state` / `load_latest_state`), one directory per kept step:
    RUN/ckpt/step_000123/model.safetensors   full (unsharded) model state dict
    RUN/ckpt/step_000123/optim.safetensors   AdamW tensors as "<param fqn>/<exp_avg|exp_avg_sq|step>"
    RUN/ckpt/step_000123/state.json          step, param_groups (by fqn), loader states per rank, config; written last
The directory is assembled under RUN/ckpt/.tmp-step_000123 and renamed into place, so a step_* directory
is complete or absent; a run killed mid-write leaves only a .tmp-* that the next save removes. Nothing
here uses pickle: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
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
    timm training scripts save them that way).
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
    headless VisionTransformer (MAE decoder, mask token, classifier heads). Returns (encoder state,
    dropped keys).
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
        if k.startswith(("decoder", "mask_token", "head.", "fc_norm.")) or k == "head":
            dropped.append(key)
        else:
            out[k] = value
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
        raise CheckpointError(f"pos_embed has {tokens} tokens; expected 1 cls + a square patch grid")
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


def load_encoder(
    path: Path | str, *, variant: str | None = None, img_size: int | None = None
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Build and load a headless encoder from an export dir, encoder.safetensors, or a timm/MAWS checkpoint.

    With our export the architecture comes from encoder.json. For other files it is `variant` /
    `img_size` when given, else inferred from tensor shapes (`infer_architecture`). Loading is strict
    on encoder keys; head/decoder keys in the file are dropped and listed in info["dropped_keys"].
    Raises CheckpointError for a missing file, a non-checkpoint, or a wrong architecture.
    """
    weights, meta = _locate(Path(path))
    state, dropped = encoder_state(read_state_dict(weights))
    if meta is not None:
        variant = variant or meta["variant"]
        img_size = img_size or int(meta["img_size"])
    if variant is None or img_size is None:
        guessed_variant, guessed_size = infer_architecture(state)
        variant, img_size = variant or guessed_variant, img_size or guessed_size
    encoder = build_encoder(variant, img_size=img_size)
    load_into(encoder, state, source=str(weights), strict=True)
    info = {
        "timm_name": get_variant(variant).timm_name,
        "kwargs": encoder_kwargs(variant, img_size=img_size),
        "variant": variant,
        "img_size": img_size,
        "path": str(weights),
        "dropped_keys": dropped,
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
    """Encoder tensors for WSP `--init` from an MAE run dir, its encoder.safetensors, a ckpt step dir,
    or a timm/MAWS file. Returns (timm-keyed encoder state, dropped keys, file read)."""
    p = Path(path)
    if p.is_dir() and not (p / ENCODER_WEIGHTS).exists() and (p / "model.safetensors").exists():
        weights = p / "model.safetensors"
    else:
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
    root = run_dir / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    tensors, groups = _flatten_optim(optim_state)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "optim.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, **meta}, indent=1) + "\n")
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_states(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_states(run_dir: Path) -> list[Path]:
    """Complete checkpoint dirs of a run, oldest first."""
    root = run_dir / "ckpt"
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and _STEP_DIR.match(d.name) and (d / "state.json").exists()]
    return sorted(dirs, key=lambda d: int(_STEP_DIR.match(d.name).group(1)))  # type: ignore[union-attr]


def load_state(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state dict keyed by fqn, meta incl. "step") from one step directory."""
    for name in ("model.safetensors", "optim.safetensors", "state.json"):
        if not (ckpt_dir / name).exists():
            raise CheckpointError(f"{ckpt_dir} is not a complete training checkpoint (no {name})")
    meta = json.loads((ckpt_dir / "state.json").read_text())
    model_state = load_file(str(ckpt_dir / "model.safetensors"))
    optim_state = _unflatten_optim(load_file(str(ckpt_dir / "optim.safetensors")), meta.pop("param_groups"))
    return model_state, optim_state, meta
