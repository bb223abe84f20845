"""Model-level checks on synthetic tensors: variant sizes, MAE masking and loss, WSP loss, optimizer, config."""

from __future__ import annotations

import math

import pytest
import torch
from maws_train.config import MAEConfig, override
from maws_train.models import VARIANTS, Classifier, MaskedAutoencoder, build_encoder, multilabel_softmax_ce
from maws_train.optim import lr_at, param_groups


def _vit_params(d: int, depth: int, mlp: int, patch: int, tokens: int) -> int:
    """Closed-form parameter count of a headless timm ViT (qkv bias, LayerNorm, cls token)."""
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 4 * d
    return 3 * patch * patch * d + d + d + tokens * d + depth * block + 2 * d


@pytest.mark.parametrize(
    "name,width,depth,heads,mlp,patch",
    [
        ("b16", 768, 12, 12, 3072, 16),
        ("l16", 1024, 24, 16, 4096, 16),
        ("h14", 1280, 32, 16, 5120, 14),
        ("2b14", 2560, 24, 32, 10240, 14),
        ("6.5b14", 4096, 32, 32, 16384, 14),
    ],
)
def test_paper_variants_have_the_paper_sizes(name, width, depth, heads, mlp, patch):
    with torch.device("meta"):  # no memory: 6.5B parameters would not fit this machine
        m = build_encoder(name, img_size=224)
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads, m.blocks[0].mlp.fc1.out_features) == (
        width, depth, heads, mlp)
    assert m.patch_embed.patch_size == (patch, patch) and m.num_features == width
    tokens = (224 // patch) ** 2 + 1
    assert sum(p.numel() for p in m.parameters()) == _vit_params(width, depth, mlp, patch, tokens)


def test_b16_matches_the_known_vit_b16_size():
    with torch.device("meta"):
        m = build_encoder("b16")
    assert sum(p.numel() for p in m.parameters()) == 85_798_656  # timm vit_base_patch16_224 without head
    assert set(VARIANTS) >= {"mu", "b16", "l16", "h14", "2b14", "6.5b14"}


def _mae(mask_ratio: float = 0.75) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(build_encoder("mu", img_size=32), decoder_dim=32, decoder_depth=1, decoder_heads=2,
                             mask_ratio=mask_ratio)


def test_exactly_a_quarter_of_patches_reach_the_encoder_and_they_are_the_lowest_noise():
    mae = _mae()
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    seen = {}
    mae.encoder.blocks[0].register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    _, pred, mask = mae(imgs, noise)
    assert seen["x"].shape == (3, 1 + 4, 64)  # cls + 16 * 25% patches
    assert pred.shape == (3, 16, 8 * 8 * 3)
    assert mask.sum(dim=1).tolist() == [12.0, 12.0, 12.0]
    kept = (mask == 0).nonzero()[:, 1].reshape(3, 4)
    assert torch.equal(kept.sort(dim=1).values, noise.argsort(dim=1)[:, :4].sort(dim=1).values)
    # The encoder input is exactly the kept patch embeddings (+ pos) in shuffle order after the cls token.
    emb = mae.encoder.patch_embed(imgs) + mae.encoder.pos_embed[:, 1:]
    ids = noise.argsort(dim=1)[:, :4]
    assert torch.allclose(seen["x"][:, 1:], torch.gather(emb, 1, ids.unsqueeze(-1).expand(-1, -1, 64)))


def _patch_pixels(mae: MaskedAutoencoder, patch: int) -> tuple[slice, slice]:
    g, p = mae.grid_size, mae.patch_size
    r, c = divmod(patch, g)
    return slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p)


def test_loss_ignores_visible_patch_targets_but_not_masked_ones():
    mae = _mae()
    imgs, noise = torch.randn(1, 3, 32, 32), torch.rand(1, 16)
    _, pred, mask = mae(imgs, noise)
    loss = mae.forward_loss(imgs, pred, mask)
    visible, masked = int((mask[0] == 0).nonzero()[0]), int((mask[0] == 1).nonzero()[0])
    changed = imgs.clone()
    rows, cols = _patch_pixels(mae, visible)
    changed[:, :, rows, cols] = torch.randn_like(changed[:, :, rows, cols]) * 5
    assert torch.equal(mae.forward_loss(changed, pred, mask), loss)
    rows, cols = _patch_pixels(mae, masked)
    changed[:, :, rows, cols] += 1.0 + torch.randn_like(changed[:, :, rows, cols])
    assert not torch.allclose(mae.forward_loss(changed, pred, mask), loss)


def test_norm_pix_loss_is_mse_to_per_patch_standardised_pixels():
    mae = _mae()
    imgs = torch.randn(2, 3, 32, 32)
    target = mae.patchify(imgs)
    pred = torch.zeros_like(target)
    mask = torch.ones(2, 16)
    # Predicting 0 against standardised targets gives mean of z^2 = (P-1)/P * var/(var+eps) ~ 1 - 1/P.
    p = target.shape[-1]
    var = target.var(dim=-1, keepdim=True)
    expected = ((target - target.mean(-1, keepdim=True)) ** 2 / (var + 1e-6)).mean()
    assert torch.allclose(mae.forward_loss(imgs, pred, mask), expected)
    assert abs(expected.item() - (p - 1) / p) < 1e-3


def test_patchify_orders_pixels_like_mae():
    mae = _mae()
    imgs = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(1, 3, 32, 32)
    x = mae.patchify(imgs)
    # patch 1 is row 0, columns 8..15; its first entry is pixel (0, 8) channel 0, then channel 1, 2.
    assert x[0, 1, :3].tolist() == [imgs[0, 0, 0, 8].item(), imgs[0, 1, 0, 8].item(), imgs[0, 2, 0, 8].item()]


def test_multilabel_ce_normalises_multi_hot_and_skips_unlabelled_rows():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 1.0, 1.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    total, count = multilabel_softmax_ce(logits, targets)
    logp = torch.log_softmax(logits, dim=1)
    expected = -(0.5 * logp[0, 0] + 0.5 * logp[0, 1]) - logp[1, 2]
    assert count.item() == 2 and torch.allclose(total, expected)


def test_classifier_head_starts_at_zero_and_sees_pooled_cls():
    enc = build_encoder("mu", img_size=32)
    clf = Classifier(enc, 7)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(clf(x), torch.zeros(2, 7))
    assert enc(x).shape == (2, enc.num_features)


def test_weight_decay_follows_mae_reference_tokens_decayed_norms_biases_not_frozen_left_out():
    mae = _mae()
    names = {id(p): n for n, p in mae.named_parameters()}
    decay, no_decay = param_groups(mae, 0.05)
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    # timm 0.3.2 add_weight_decay (MAE main_pretrain): every tensor with ndim > 1 is decayed, tokens included
    assert "encoder.cls_token" in decayed and "mask_token" in decayed
    assert "encoder.norm.weight" in plain and "decoder_norm.bias" in plain
    assert "encoder.blocks.0.attn.qkv.bias" in plain and "encoder.blocks.0.attn.qkv.weight" in decayed
    # MAE's sin-cos tables are fixed: not optimised at all.
    assert "encoder.pos_embed" not in decayed | plain and "decoder_pos_embed" not in decayed | plain
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decayed | plain == {n for n, p in mae.named_parameters() if p.requires_grad}
    # the old choice, behind optim.decay_tokens=false
    decay, no_decay = param_groups(mae, 0.05, decay_tokens=False)
    assert {"encoder.cls_token", "mask_token"} <= {names[id(p)] for p in no_decay["params"]}
    assert {"encoder.cls_token", "mask_token"}.isdisjoint(names[id(p)] for p in decay["params"])
    # a learned pos_embed (WSP) is never decayed, whatever decay_tokens says
    enc = build_encoder("mu", img_size=32)
    enc_names = {id(p): n for n, p in enc.named_parameters()}
    assert "pos_embed" in {enc_names[id(p)] for p in param_groups(enc, 0.1)[1]["params"]}


def test_optimizer_reads_decay_tokens_from_the_config():
    from maws_train.optim import build_optimizer

    mae = _mae()
    for flag, expect in ((True, 0.05), (False, 0.0)):
        cfg = override(MAEConfig(), [f"optim.decay_tokens={str(flag).lower()}"]).optim
        opt = build_optimizer(mae, cfg, lr=1e-3)
        group = next(g for g in opt.param_groups if any(p is mae.mask_token for p in g["params"]))
        assert group["weight_decay"] == expect


def test_decoder_layernorm_eps_is_1e6_even_where_timm_blocks_default_to_1e5(monkeypatch):
    """timm 1.0.0-1.0.15's Block defaults to nn.LayerNorm (eps 1e-5); MAE's decoder uses 1e-6. Emulate the old
    default and check every decoder norm still has MAE's eps (the encoder's come from timm's ViT: 1e-6)."""
    import maws_train.models.mae as mae_mod
    from timm.models.vision_transformer import Block

    class OldTimmBlock(Block):
        def __init__(self, *args, norm_layer=torch.nn.LayerNorm, **kwargs):
            super().__init__(*args, norm_layer=norm_layer, **kwargs)

    monkeypatch.setattr(mae_mod, "Block", OldTimmBlock)
    mae = _mae()
    decoder_norms = [m for n, m in mae.named_modules() if n.startswith("decoder") and isinstance(m, torch.nn.LayerNorm)]
    assert len(decoder_norms) == 3  # norm1, norm2 of the one block + decoder_norm
    encoder_norms = [m for m in mae.encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert {m.eps for m in decoder_norms + encoder_norms} == {1e-6}


def test_lr_warms_up_linearly_per_step_then_follows_a_cosine():
    kw = {"peak": 1.0, "total_steps": 110, "warmup_steps": 10, "min_lr": 0.1}
    # MAE lr_sched: lr = peak * s / W during warmup (step 0 at 0), peak at step W
    assert [lr_at(s, **kw) for s in (0, 1, 4, 9)] == [0.0, 0.1, 0.4, 0.9]
    assert lr_at(10, **kw) == 1.0
    assert math.isclose(lr_at(60, **kw), 0.1 + 0.9 * 0.5)
    assert math.isclose(lr_at(110, **kw), 0.1)


def test_set_overrides_are_typed_and_reject_unknown_fields():
    cfg = override(MAEConfig(), ["optim.base_lr=1e-3", "run.steps=7", "run.compile=true", "model.variant=mu",
                                 "model.img_size=32", "data.backend=webdataset"])
    assert (cfg.optim.base_lr, cfg.run.steps, cfg.run.compile, cfg.model.variant) == (1e-3, 7, True, "mu")
    with pytest.raises(ValueError, match="no field 'lr'"):
        override(cfg, ["optim.lr=1"])
    with pytest.raises(ValueError, match="expected int"):
        override(cfg, ["run.steps=many"])
    with pytest.raises(ValueError, match="expected one of"):
        override(cfg, ["data.backend=magic"])
    with pytest.raises(ValueError, match="multiple of patch size"):
        override(cfg, ["model.img_size=30"])


def test_our_mae_equals_the_reference_formulation_used_by_the_bench():
    import importlib.util
    from pathlib import Path

    bench_path = Path(__file__).resolve().parents[2] / "tools" / "bench" / "train.py"
    spec = importlib.util.spec_from_file_location("bench_train", bench_path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mae = _mae()
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    loss, _, _ = mae(imgs, noise)
    assert torch.allclose(loss, bench.reference_mae_loss(mae, imgs, noise), rtol=1e-6, atol=1e-7)
