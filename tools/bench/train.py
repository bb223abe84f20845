"""Training throughput and model FLOPs utilisation (MFU): MAE and WSP at ViT-B/16, 224 px.

Each configuration runs full training steps (forward, backward, fused/foreach AdamW) on a fixed batch of
synthetic ImageNet-normalised images (the model step only; the loader has its own bench, loader.py):

  mae         maws_train.models.MaskedAutoencoder: encoder on the 25% visible patches, 8x512 decoder
  mae_ref     the reference formulation, written out straight from MAE's models_mae.py forward (MAE's
              patchify/einsum, argsort masking, per-block Python loops, loss) on the same weights: the
              baseline our MAE is compared to in the same run
  mae_full    the naive alternative: the encoder runs on all 196 patches (masked ones replaced by a
              learned token, SimMIM style), then the decoder: what MAE's 25% trick saves
  wsp         maws_train.models.Classifier: encoder on all patches + linear head (here 1,000 classes)

FLOPs are counted, not assumed: torch.utils.flop_counter.FlopCounterMode on one training step (matmuls,
convolutions, attention; fwd + bwd), so MAE's encoder is charged for 50 tokens, not 197. MFU = achieved
FLOP/s / peak. Peak: --peak-tflops, else 989 TFLOP/s for an H100/H200 in bf16 (dense); on CPU there is no
reliable peak for a shared machine, so only images/s and achieved GFLOP/s are printed unless given.

    uv run python tools/bench/train.py                                  # CPU: batch 4, 3 timed steps
    uv run python tools/bench/train.py --device cuda --batch 256 --steps 20 --compile   # GPU, bf16
"""

from __future__ import annotations

import argparse
import time

import torch
from maws_train.models import Classifier, MaskedAutoencoder, build_encoder, get_variant
from maws_train.optim import param_groups
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

H100_H200_BF16_DENSE_TFLOPS = 989.0


def reference_mae_loss(m: MaskedAutoencoder, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MAE's models_mae.py forward, line by line, using `m`'s parameters (same numbers as m(imgs, noise))."""
    enc = m.encoder
    p = m.patch_size
    # forward_encoder
    x = enc.patch_embed(imgs)
    x = x + enc.pos_embed[:, 1:, :]
    n, length, d = x.shape
    len_keep = int(length * (1 - m.mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones([n, length], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    cls_token = enc.cls_token + enc.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in enc.blocks:
        x = blk(x)
    latent = enc.norm(x)
    # forward_decoder
    x = m.decoder_embed(latent)
    mask_tokens = m.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        x = blk(x)
    x = m.decoder_norm(x)
    pred = m.decoder_pred(x)[:, 1:, :]
    # forward_loss (patchify as in MAE: reshape + einsum)
    h = w = imgs.shape[2] // p
    target = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(imgs.shape[0], h * w, p**2 * 3)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


class FullSequenceMAE(nn.Module):
    """Naive masking: the encoder sees every patch, masked ones replaced by a learned token."""

    def __init__(self, m: MaskedAutoencoder) -> None:
        super().__init__()
        self.m = m
        self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, m.encoder.embed_dim))

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        m, enc = self.m, self.m.encoder
        x = enc.patch_embed(imgs)
        _, mask, ids_restore = m.random_masking(x, noise)
        x = torch.where(mask.unsqueeze(-1).bool(), self.enc_mask_token.to(x.dtype), x) + enc.pos_embed[:, 1:]
        x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        latent = enc.norm(enc.blocks(x))
        # The decoder then sees the visible latents only, exactly as in MAE.
        keep = ids_restore.argsort(dim=1)[:, : m.num_keep]
        visible = torch.gather(latent[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, latent.shape[-1]))
        pred = m.forward_decoder(torch.cat([latent[:, :1], visible], dim=1), ids_restore)
        return m.forward_loss(imgs, pred, mask)


def make_step(name: str, *, variant: str, img: int, classes: int, device: torch.device, compile: bool,
              compile_mode: str = "default"):
    torch.manual_seed(0)
    if name == "wsp":
        module: nn.Module = Classifier(build_encoder(variant, img_size=img), classes)
    else:
        mae = MaskedAutoencoder(build_encoder(variant, img_size=img))
        module = FullSequenceMAE(mae) if name == "mae_full" else mae
    module = module.to(device)
    opt = torch.optim.AdamW(param_groups(module, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            fused=device.type == "cuda" or None)
    fwd = module
    if name == "mae_ref":
        def fwd(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            return reference_mae_loss(mae, x, noise)
    if compile and device.type == "cuda" and name != "mae_ref":  # the reference stays eager
        fwd = torch.compile(fwd, mode=compile_mode)
    targets = torch.zeros(1, classes, device=device)

    def step(x: torch.Tensor, noise: torch.Tensor, autocast: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if name == "wsp":
                logits = fwd(x)
                t = targets.expand(x.shape[0], -1).clone()
                t[:, 0] = 1.0
                loss = torch.nn.functional.cross_entropy(logits.float(), t)
            else:
                out = fwd(x, noise)
                loss = out[0] if isinstance(out, tuple) else out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variant", default="b16")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=0, help="per step (default: 4 on CPU, 256 on GPU)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (best one reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--only", nargs="*", default=["mae", "mae_ref", "mae_full", "wsp"])
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    batch = args.batch or (256 if device.type == "cuda" else 4)
    autocast = device.type == "cuda" and not args.fp32
    peak = args.peak_tflops or (H100_H200_BF16_DENSE_TFLOPS if device.type == "cuda" and autocast else 0.0)
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads) variant={args.variant} img={args.img} batch={batch} "
          f"bf16={autocast} compile={(args.compile and device.type == 'cuda') and args.compile_mode} peak={peak or 'n/a'} TFLOP/s")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, args.img, args.img, generator=gen).to(device)
    patches = (args.img // get_variant(args.variant).patch_size) ** 2
    noise = torch.rand(batch, patches, generator=gen).to(device)

    results = {}
    for name in args.only:
        step = make_step(name, variant=args.variant, img=args.img, classes=args.classes, device=device,
                         compile=args.compile, compile_mode=args.compile_mode)
        with FlopCounterMode(display=False) as counter:  # eager count of one fwd+bwd (+ optimizer: ~0 flops)
            make_step(name, variant=args.variant, img=args.img, classes=args.classes, device=device,
                      compile=False)(x, noise, autocast)
        flops = counter.get_total_flops()
        for _ in range(args.warmup):
            step(x, noise, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        # Best of N single-step times: on a shared machine the minimum is the least disturbed measurement.
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step(x, noise, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        dt = min(times)
        achieved = flops / dt
        results[name] = batch / dt
        mfu = f"{100 * achieved / (peak * 1e12):5.1f}%" if peak else "  n/a"
        print(f"{name:9s} {batch / dt:9.2f} img/s  {flops / batch / 1e9:7.1f} GFLOP/img (fwd+bwd)  "
              f"{achieved / 1e9:9.1f} GFLOP/s  MFU {mfu}", flush=True)
        del step
    if "mae" in results and "mae_ref" in results:
        print(f"ratio mae / mae_ref (reference formulation): {results['mae'] / results['mae_ref']:.2f}x")
    if "mae" in results and "mae_full" in results:
        print(f"ratio mae / mae_full (encoder on all patches): {results['mae'] / results['mae_full']:.2f}x")
    if "mae" in results and "wsp" in results:
        print(f"ratio mae / wsp images/s: {results['mae'] / results['wsp']:.2f}x")


if __name__ == "__main__":
    main()
