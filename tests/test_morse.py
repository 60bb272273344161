"""MORSE: point sampling, Fourier features, SMoE gating, the loss schedule, every backbone x
variant, 3D paths, checkpoints and a tiny training where rendering does not hurt."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import write_blobs
from inrseg.core.errors import InputError
from inrseg.data.layouts import open_dataset
from inrseg.data.splits import split_by_subject
from inrseg.data.volume import Volume
from inrseg.methods.base import Segmenter
from inrseg.methods.morse import (MORSE, RECIPE, VARIANTS, MorseConfig, dropout_ramp, morse_config, morse_losses,
                                  rend_weight)
from inrseg.methods.registry import load_segmenter
from inrseg.metrics import case_metrics
from inrseg.nn.backbones import build_backbone
from inrseg.nn.fourier import GaussianFourierFeatures
from inrseg.nn.morse import MorseNet, StochasticMoE
from inrseg.nn.point_sampling import (grid_point_coords, most_uncertain_points, point_sample,
                                      sample_training_points, uncertainty)

TINY_UNET = {"channels": (8, 16, 32), "num_res_units": 1}
TINY_TRANSUNET = dict(cnn_channels=(8, 8, 16, 16), hidden_size=16, num_layers=1, num_heads=2,
                      mlp_dim=16, decoder_channels=(16, 8, 8, 8))
TINY_UNETR = dict(feature_size=4, hidden_size=16, mlp_dim=16, num_heads=2)
TINY_HEADS = dict(moe_dim=8, gate_dim=8, point_width=16, fourier_frequencies=8, train_points=64,
                  test_points=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a busy 2-core machine two threads oversubscribe badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_cfg(backbone: str, variant: str, nd: int = 2, **kw) -> MorseConfig:
    over = {"unet": TINY_UNET, "unet3d": TINY_UNET, "transunet": TINY_TRANSUNET,
            "unetr": TINY_UNETR}[backbone]
    return morse_config(backbone, variant, nd, backbone_overrides=over, **{**TINY_HEADS, **kw})


# ------------------------------------------------------------------------------ point sampling
def test_point_sample_reads_voxel_centres_in_axis_order():
    fmap = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    coords = grid_point_coords((4, 5)).expand(2, -1, -1)
    out = point_sample(fmap, coords)
    torch.testing.assert_close(out, fmap.reshape(2, 3, -1))
    vol = torch.randn(1, 2, 3, 4, 5)
    torch.testing.assert_close(point_sample(vol, grid_point_coords((3, 4, 5))[None]), vol.reshape(1, 2, -1))


def test_uncertainty_is_second_minus_largest():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 0.0, -1.0]]).T[None]  # (1, 3 classes, 2 points)
    torch.testing.assert_close(uncertainty(logits), torch.tensor([[[-0.5, 0.0]]]))


def test_training_points_keep_the_most_uncertain_candidates():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 20)
    n, k, rho = 100, 3, 0.75
    g = torch.Generator().manual_seed(1)
    pts = sample_training_points(logits, n, k, rho, generator=g)
    assert pts.shape == (2, n, 2) and pts.abs().max() <= 1
    # replay the candidates with the same generator: the kept ones are their top rho * n
    g = torch.Generator().manual_seed(1)
    cand = torch.rand(2, k * n, 2, generator=g) * 2 - 1
    unc = uncertainty(point_sample(logits, cand))[:, 0]
    n_imp = int(round(rho * n))
    for b in range(2):
        top = unc[b].topk(n_imp).indices
        torch.testing.assert_close(pts[b, :n_imp].sort(0).values, cand[b, top].sort(0).values)
        kept_unc = uncertainty(point_sample(logits[b:b + 1], pts[b:b + 1, :n_imp]))[0, 0]
        assert kept_unc.min() >= unc[b].sort(descending=True).values[n_imp - 1] - 1e-6


def test_coverage_points_are_uniform():
    # logits uncertain only in the left half: the importance points go there, the coverage
    # points (the last (1 - rho) * n) spread uniformly over the field of view
    logits = torch.zeros(1, 2, 32, 32)
    logits[:, 0, :, 16:] = 10.0
    pts = sample_training_points(logits, 4000, 3, 0.75, generator=torch.Generator().manual_seed(0))
    imp, cov = pts[0, :3000], pts[0, 3000:]
    assert (imp[:, 1] < 0).float().mean() > 0.95
    # coverage: mean 0, variance 1/3 of U(-1, 1), quadrant counts ~ 250 each (chi^2, 3 dof)
    assert cov.abs().max() <= 1 and cov.mean(0).abs().max() < 0.1
    assert (cov.var(0) - 1 / 3).abs().max() < 0.05
    counts = torch.stack([(cov[:, 0] < 0) & (cov[:, 1] < 0), (cov[:, 0] < 0) & (cov[:, 1] >= 0),
                          (cov[:, 0] >= 0) & (cov[:, 1] < 0), (cov[:, 0] >= 0) & (cov[:, 1] >= 0)]).sum(1)
    chi2 = float(((counts - 250.0) ** 2 / 250.0).sum())
    assert chi2 < 16.3  # p = 0.001


def test_most_uncertain_points_exact_counts_2d_3d():
    logits = torch.randn(2, 4, 6, 7)
    idx, coords = most_uncertain_points(logits, 10)
    assert idx.shape == (2, 10) and coords.shape == (2, 10, 2)
    unc = uncertainty(logits).reshape(2, -1)
    for b in range(2):
        assert set(idx[b].tolist()) == set(unc[b].topk(10).indices.tolist())
    # the coordinates are the chosen voxels' centres
    torch.testing.assert_close(point_sample(logits, coords), torch.gather(
        logits.reshape(2, 4, -1), 2, idx[:, None].expand(-1, 4, -1)))
    idx3, c3 = most_uncertain_points(torch.randn(1, 3, 4, 5, 6), 1000)
    assert idx3.shape == (1, 120) and c3.shape == (1, 120, 3)  # capped at the voxel count


# ------------------------------------------------------------------------------ Fourier
def test_fourier_features_formula_and_trainable_flag():
    ff = GaussianFourierFeatures(2, num_frequencies=128, sigma=2.0, trainable=True)
    x = torch.rand(5, 7, 2) * 2 - 1
    out = ff(x)
    assert out.shape == (5, 7, 256) and ff.out_dim == 256
    proj = 2 * math.pi * x @ ff.B.detach()
    torch.testing.assert_close(out, torch.cat([proj.sin(), proj.cos()], -1))
    assert isinstance(ff.B, torch.nn.Parameter) and ff.B.requires_grad
    assert abs(float(ff.B.detach().std()) - 2.0) < 0.3
    fixed = GaussianFourierFeatures(3, 16, trainable=False)
    assert not any(True for _ in fixed.parameters()) and "B" in dict(fixed.named_buffers())
    assert fixed(torch.zeros(4, 3)).shape == (4, 32)


# ------------------------------------------------------------------------------ SMoE
def test_gate_weights_sum_to_one_and_dropout_only_in_training():
    torch.manual_seed(0)
    moe = StochasticMoE(2, (16, 8, 4), dim=8, gate_dim=8, expert_dropout="bernoulli", alpha=0.7)
    feats = [torch.randn(6, 16, 4, 4), torch.randn(6, 8, 8, 8), torch.randn(6, 4, 16, 16)]
    moe.train()
    fused, w = moe(feats)
    assert fused.shape == (6, 8, 16, 16) and w.shape == (6, 3, 16, 16)
    torch.testing.assert_close(w.sum(1), torch.ones(6, 16, 16))
    masks = torch.cat([moe.expert_mask(200) for _ in range(10)])
    assert (masks.sum(1) >= 1).all()                       # never all experts dropped
    assert 0.2 < float(masks.mean()) < 0.45                 # ~ (1 - alpha), plus the rescued ones
    assert (w.flatten(2).amax(2) == 0).any()                # some experts off in training
    moe.eval()
    _, w1 = moe(feats)
    fused2, w2 = moe(feats)
    torch.testing.assert_close(w1.sum(1), torch.ones(6, 16, 16))
    assert (w1 > 0).all()                                    # all experts on at inference
    torch.testing.assert_close(w1, w2)
    assert (moe.expert_mask(5) == 1).all()
    count = StochasticMoE(2, (16, 8, 4), dim=8, gate_dim=8, expert_dropout="count").train()
    m = count.expert_mask(2000)
    assert (m.sum(1) >= 1).all() and set(m.sum(1).long().tolist()) == {1, 2, 3}


def test_dropout_warmup_scales_the_drop_rate():
    """The warm-up ramp, and what a scale does to each dropout rule (counted over many draws)."""
    assert [dropout_ramp(s, 50) for s in (0, 25, 50, 99)] == [0.0, 0.5, 1.0, 1.0]
    assert dropout_ramp(0, 0) == 1.0                        # paper: full rate from step 0
    bern = StochasticMoE(2, (4, 4, 4), dim=4, gate_dim=4, expert_dropout="bernoulli", alpha=0.7).train()
    gen = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    bern.dropout_scale = 0.0
    assert (bern.expert_mask(500) == 1).all()               # nothing dropped at the ramp's start
    bern.dropout_scale = 0.5                                # drop rate 0.35: kept share ~0.65
    assert 0.6 < float(bern.expert_mask(3000).mean()) < 0.7
    bern.dropout_scale = 1.0
    full = bern.expert_mask(1, generators=gen())
    count = StochasticMoE(2, (4, 4, 4), dim=4, gate_dim=4, expert_dropout="count").train()
    count.dropout_scale = 0.0
    assert (count.expert_mask(500) == 1).all()
    count.dropout_scale = 0.5                               # half the images keep every expert
    share = float((count.expert_mask(4000).sum(1) == 3).float().mean())
    assert 0.5 + 0.5 / 3 - 0.04 < share < 0.5 + 0.5 / 3 + 0.04, share
    assert full.shape == (1, 3)
    assert morse_config(preset="paper").dropout_warmup_steps == 0
    assert morse_config(preset="cpu").dropout_warmup_steps == 5000
    with pytest.raises(ValueError, match="dropout_warmup_steps"):
        morse_config(dropout_warmup_steps=-1)


def test_fit_applies_the_warmup_at_every_step(blobs2d, monkeypatch):
    """``fit`` sets the SMoE's drop-rate scale from the ramp before each step's forward pass."""
    import inrseg.methods.morse.segmenter as morse_mod

    seen: list[tuple[int, int]] = []
    real = morse_mod.dropout_ramp
    monkeypatch.setattr(morse_mod, "dropout_ramp", lambda i, w: seen.append((i, w)) or real(i, w))
    cfg = _tiny_cfg("unet", "smoe", steps=4, val_every=4, batch_size=2, dropout_warmup_steps=2)
    model = MORSE(blobs2d.label_names, 2, 1, cfg)
    scales = []
    model.net.smoe.register_forward_pre_hook(lambda m, a: scales.append(m.dropout_scale) if m.training else None)
    model.fit(blobs2d.train[:2])
    assert seen == [(i, 2) for i in range(4)]
    assert scales == [0.0, 0.5, 1.0, 1.0]


def test_schedule_fits_the_budget(blobs2d, tmp_path):
    """A budget that ends training long before T: the lr decay and the L_rend / dropout schedules
    run over the T that fits it (recorded in the checkpoint); without a budget T stays."""
    import json

    from inrseg.engine import Budget

    train, val = blobs2d.train[:6], blobs2d.train[6:]
    cfg = _tiny_cfg("unet", "morse", steps=100_000, val_every=20, batch_size=2)
    model = MORSE(blobs2d.label_names, 2, 1, cfg)
    log = tmp_path / "log.jsonl"
    model.fit(train, val, budget=Budget(0.15), log_path=log)
    T = model.schedule_steps
    assert 1 < T < 100_000
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    for e in entries:  # the lr after step s follows lr0 (1 - s / T) ** 0.9 with the fitted T
        assert e["lr"] == pytest.approx(cfg.lr * max(0.0, 1 - min(e["step"], T) / T) ** cfg.poly_power, rel=1e-6)
    assert entries[-1]["step"] <= T
    model.save(tmp_path / "m.safetensors")
    assert load_segmenter(tmp_path / "m.safetensors").schedule_steps == T
    unfitted = MORSE(blobs2d.label_names, 2, 1, _tiny_cfg("unet", "morse", steps=7, val_every=7, batch_size=2))
    unfitted.fit(train[:2])
    assert unfitted.schedule_steps == 7
    off = MORSE(blobs2d.label_names, 2, 1, _tiny_cfg("unet", "baseline", steps=100_000, batch_size=2,
                                                      fit_schedule_to_budget=False))
    off.fit(train[:2], budget=Budget(0.02))
    assert off.schedule_steps == 100_000


def test_per_image_generators_make_draws_independent_of_the_batch():
    """Expert dropout and training points of an image depend on its generator only, not on the
    batch it is in (what makes 2 ranks x 1 image equal 1 process x 2 images)."""
    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    moe = StochasticMoE(2, (4, 4, 4, 4), dim=4, gate_dim=4, expert_dropout="count").train()
    torch.testing.assert_close(moe.expert_mask(3, generators=gens(5, 6, 7))[1:],
                               moe.expert_mask(2, generators=gens(6, 7)))
    torch.manual_seed(0)
    net = MorseNet(build_backbone("unet", 2, 1, 3, **TINY_UNET), 3, **_tiny_cfg("unet", "iar").network_args()).train()
    x = torch.randn(2, 1, 16, 16)
    both = net(x, 32, gens(1, 2))
    alone = net(x[1:], 32, gens(2))
    assert both.coords.shape == (2, 32, 2) and both.points.shape == (2, 3, 32)
    torch.testing.assert_close(both.coords[1:], alone.coords)
    torch.testing.assert_close(both.points[1:], alone.points)
    assert net(x).coords is None                           # no points unless asked
    with pytest.raises(ValueError, match="no point head"):
        MorseNet(build_backbone("unet", 2, 1, 3, **TINY_UNET), 3, **_tiny_cfg("unet", "smoe").network_args())(x, 8)


def test_rend_weight_schedule():
    assert rend_weight(0, 1000) == 0 and rend_weight(500, 1000) == 0.0
    assert rend_weight(501, 1000) == pytest.approx(0.1 * 1 / 1000)
    assert rend_weight(750, 1000) == pytest.approx(0.025)
    assert rend_weight(1000, 1000) == pytest.approx(0.05)
    assert rend_weight(1000, 1000, lambda_rend=0.2) == pytest.approx(0.1)


# ------------------------------------------------------------------------------ backbones x variants
@pytest.mark.parametrize("backbone,nd,size", [("unet", 2, (32, 48)), ("transunet", 2, (32, 48)),
                                               ("unetr", 2, (32, 32)), ("unet3d", 3, (16, 16, 16)),
                                               ("unetr", 3, (16, 16, 16))])
def test_every_backbone_and_variant_forward_backward(backbone, nd, size):
    torch.manual_seed(0)
    for variant in VARIANTS:
        cfg = _tiny_cfg(backbone, variant, nd, patch_size=size)
        bb = build_backbone(backbone, nd, 1, 3, img_size=size, **cfg.backbone_overrides)
        net = MorseNet(bb, 3, **cfg.network_args()).train()
        x = torch.randn(2, 1, *size)
        out = net(x)
        assert out.coarse.shape == (2, 3, *size)
        loss = out.coarse.square().mean()
        if net.point_head is not None:
            coords = sample_training_points(out.coarse, 32)
            pts = net.point_logits(out.fine, out.coarse, coords)
            assert pts.shape == (2, 3, 32)
            loss = loss + pts.square().mean()
            if variant in ("iar", "morse"):
                assert net.fourier is not None
        loss.backward()
        n_grad = sum(p.grad is not None for p in net.parameters())
        assert n_grad > 0
        net.eval()
        with torch.no_grad():
            ref = net.render(net(x), size, 50)
            assert ref.shape == (2, 3, *size)
            up = net.render(net(x), [2 * n for n in size], 50)
            assert up.shape == (2, 3, *[2 * n for n in size])


def test_render_changes_only_the_uncertain_points():
    torch.manual_seed(0)
    cfg = _tiny_cfg("unet", "iar")
    net = MorseNet(build_backbone("unet", 2, 1, 3, **TINY_UNET), 3, **cfg.network_args()).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 16))
        refined = net.render(out, (16, 16), 20)
    changed = (refined != out.coarse).any(1).reshape(-1)
    idx, _ = most_uncertain_points(out.coarse, 20)
    assert changed.sum() <= 20 and set(changed.nonzero()[:, 0].tolist()) <= set(idx[0].tolist())


# ------------------------------------------------------------------------------ the Segmenter
@pytest.fixture(scope="module")
def blobs2d(tmp_path_factory):
    return open_dataset(write_blobs(tmp_path_factory.mktemp("m2") / "ds", n=8))


@pytest.fixture(scope="module")
def blobs3d(tmp_path_factory):
    return open_dataset(write_blobs(tmp_path_factory.mktemp("m3") / "ds", n=3, shape=(20, 20, 20)))


def _dice(model, cases, refine=None):
    return float(np.mean([case_metrics(model.predict(c.load_image(), refine=refine).data,
                                       c.load_labels().data, 3, distances=False).mean_foreground_dice
                          for c in cases]))


def test_tiny_training_refined_not_worse_than_coarse_and_save_load(blobs2d, tmp_path):
    torch.manual_seed(0)
    train, val = split_by_subject(blobs2d.train, 0.25)
    cfg = morse_config("unet", "morse", 2, steps=150, val_every=50, lr=3e-3, batch_size=4,
                       backbone_overrides=TINY_UNET, moe_dim=16, gate_dim=16, point_width=64,
                       train_points=256, test_points=128, dropout_warmup_steps=75)
    model = MORSE(blobs2d.label_names, 2, 1, cfg)
    assert isinstance(model, Segmenter)
    model.fit(train, val)
    assert model.rend_steps > 0 and model.best_step is not None
    assert {"val_dice", "val_dice_coarse", "loss_sup"} <= set(model.history[-1])
    coarse, refined = _dice(model, val, refine=False), _dice(model, val)
    assert coarse > 0.8 and refined >= coarse - 0.005, (coarse, refined)
    model.save(tmp_path / "m.safetensors")
    again = load_segmenter(tmp_path / "m.safetensors", method="morse")
    assert again.config == model.config and again.rend_steps == model.rend_steps
    img = val[0].load_image()
    np.testing.assert_array_equal(model.predict(img).data, again.predict(img).data)
    fine = again.predict(img, scale=2.0)
    assert fine.shape == (64, 64)


def test_resume_continues_from_saved_step(blobs2d, tmp_path):
    state = tmp_path / "m.train-state"
    train, val = split_by_subject(blobs2d.train, 0.25)
    first = MORSE(blobs2d.label_names, 2, 1, _tiny_cfg("unet", "morse", steps=6, val_every=3))
    first.fit(train, val[:1], state_path=state)
    # rend_steps is that of the kept (best) weights: T = 6 turns L_rend on after step 3
    assert first.rend_steps == max(0, first.best_step - 3)
    second = MORSE(blobs2d.label_names, 2, 1, _tiny_cfg("unet", "morse", steps=12, val_every=3))
    second.fit(train, val[:1], state_path=state)
    assert [h["step"] for h in second.history] == [3, 6, 9, 12]
    # the resumed count (3 after step 6) goes on; with T = 12 every later step is a rend step
    s = second.best_step
    assert second.rend_steps == (max(0, s - 3) if s <= 6 else 3 + s - 6)


def test_3d_training_crops_and_sliding_window(blobs3d, tmp_path):
    for backbone in ("unet3d", "unetr"):
        cfg = _tiny_cfg(backbone, "morse", 3, steps=4, val_every=4, batch_size=1, patch_size=(16, 16, 16))
        model = MORSE(blobs3d.label_names, 3, 1, cfg)
        model.fit(blobs3d.train[:2], blobs3d.train[2:])
        assert model.rend_steps > 0
        img = blobs3d.train[2].load_image()          # 20^3 > 16^3 crop: sliding windows
        out = model.predict(img)
        assert out.shape == (20, 20, 20) and out.data.max() < 3
        assert model.predict(img, scale=0.5).shape == (10, 10, 10)
        model.save(tmp_path / f"{backbone}.safetensors")
        again = MORSE.load(tmp_path / f"{backbone}.safetensors")
        np.testing.assert_array_equal(out.data, again.predict(img).data)


def test_every_tensor_on_the_model_device(tmp_path):
    """With the default device "meta", a CPU model trains (with validation, resume state and
    metrics log) and predicts: nothing is created on an implicit device."""
    d2 = open_dataset(write_blobs(tmp_path / "d2", n=3, shape=(16, 16)))
    d3 = open_dataset(write_blobs(tmp_path / "d3", n=3, shape=(12, 12, 12)))
    tiny = dict(backbone_overrides={"channels": (4, 8), "num_res_units": 1}, moe_dim=4, gate_dim=4,
                point_width=8, fourier_frequencies=4, train_points=16, test_points=16, steps=4,
                val_every=4, batch_size=2)  # validation at step 4, after 2 steps with L_rend
    runs = [(d2, "unet", "morse", {}), (d2, "unet", "pointrend", {}),
            (d3, "unet3d", "morse", {"patch_size": (8, 8, 8)})]
    torch.set_default_device("meta")
    try:
        for k, (ds, backbone, variant, extra) in enumerate(runs):
            nd = ds.spatial_ndim
            model = MORSE(ds.label_names, nd, 1, morse_config(backbone, variant, nd, **tiny, **extra),
                          device="cpu")
            assert {p.device.type for p in model.net.parameters()} == {"cpu"}
            model.fit(ds.train[:2], ds.train[2:], state_path=tmp_path / f"{k}.train-state",
                      log_path=tmp_path / f"{k}.jsonl")
            assert model.rend_steps > 0 and (tmp_path / f"{k}.train-state").exists()
            img = ds.train[2].load_image()
            assert model.predict(img).shape == img.shape   # 3D: 12^3 > 8^3, sliding windows
            assert model.predict(img, scale=2).shape == tuple(2 * n for n in img.shape)
    finally:
        torch.set_default_device(None)


def test_unetr_2d_predicts_images_of_other_sizes(blobs2d):
    model = MORSE(blobs2d.label_names, 2, 1, _tiny_cfg("unetr", "morse", patch_size=(16, 16)))
    img = blobs2d.train[0].load_image()               # 32 x 32 > 16 x 16 fixed input
    assert model.predict(img).shape == (32, 32)
    small = Volume(img.data[:, :12, :10], img.affine, 2)
    assert model.predict(small).shape == (12, 10)


def test_bad_config_and_input(blobs2d):
    with pytest.raises(ValueError):
        MorseConfig(variant="nope")
    with pytest.raises(ValueError):
        MorseConfig(backbone="resnet")
    model = MORSE(blobs2d.label_names, 2, 2, _tiny_cfg("unet", "baseline"))
    with pytest.raises(InputError):                       # 1-channel image, 2-channel model
        model.predict(blobs2d.train[0].load_image())
    with pytest.raises(InputError, match="unet3d"):        # a 3D backbone on 2D data
        MORSE(blobs2d.label_names, 2, 1, _tiny_cfg("unet3d", "morse"))
    with pytest.raises(InputError, match="multiples of 16"):
        MORSE(blobs2d.label_names, 2, 1, _tiny_cfg("unetr", "morse", patch_size=(20, 20)))


def test_rend_and_sup_loss_skip_ignored_points():
    """MORSE's losses with an ignore label: DiceCE over annotated voxels, and the rendering cross
    entropy over the points whose (nearest) label is annotated; ignored ones get no gradient."""
    from types import SimpleNamespace

    from inrseg.data.volume import IGNORE
    from inrseg.losses import DiceCELoss, masked_cross_entropy

    model = MORSE(["bg", "a", "b"], 2, 1, _tiny_cfg("unet", "morse"))
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (2, 1, 8, 8), generator=gen)
    y[0, :, :4] = IGNORE
    coarse = torch.randn(2, 3, 8, 8, generator=gen, requires_grad=True)
    coords = grid_point_coords((8, 8))[None].expand(2, -1, -1)    # the voxel centres
    points = torch.randn(2, 3, 64, generator=gen, requires_grad=True)
    fake = lambda x, n, g: SimpleNamespace(coarse=coarse, coords=coords, points=points)  # noqa: E731
    loss, parts = model.losses(fake, None, y, 0.5, DiceCELoss(IGNORE))
    target = y[:, 0].reshape(2, -1)
    assert parts["loss_rend"] == pytest.approx(masked_cross_entropy(points, target, IGNORE).item(), rel=1e-6)
    keep = target != IGNORE
    ref = torch.nn.functional.cross_entropy(points.detach().transpose(1, 2)[keep], target[keep])
    assert parts["loss_rend"] == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert (points.grad.transpose(1, 2)[~keep] == 0).all() and (points.grad.transpose(1, 2)[keep] != 0).any()
    assert (coarse.grad[:, :, :4][0] == 0).all()
    # no training points drawn (L_rend off): the supervised loss alone, whatever the weight
    sup, parts0 = morse_losses(SimpleNamespace(coarse=coarse, coords=None, points=None), y, 0.5, DiceCELoss(IGNORE))
    assert "loss_rend" not in parts0 and sup.item() == pytest.approx(parts0["loss_sup"])
    assert parts0["loss_sup"] == pytest.approx(parts["loss_sup"]) and parts0["lambda_rend"] == 0.5



def test_budget_timing_uses_the_training_optimizer(blobs2d, monkeypatch):
    """The step timed to fit the schedule to a budget runs the optimiser training runs (SGD here),
    on a throwaway copy: one optimiser for the timing, one for training, both SGD."""
    from inrseg.engine import Budget

    made: list[torch.optim.Optimizer] = []
    real = MORSE.make_optimizer
    monkeypatch.setattr(MORSE, "make_optimizer", lambda self, params: made.append(real(self, params)) or made[-1])
    cfg = _tiny_cfg("unet", "iar", steps=100_000, val_every=1000, batch_size=2, optimizer="sgd", lr=1e-2)
    model = MORSE(blobs2d.label_names, 2, 1, cfg)
    model.fit(blobs2d.train[:2], budget=Budget(0.05))
    assert len(made) == 2 and all(type(o) is torch.optim.SGD for o in made)
    assert made[0].param_groups[0]["params"][0] is not next(model.net.parameters())   # timed on a copy
    assert made[1].param_groups[0]["params"][0] is next(model.net.parameters())
    assert 1 <= model.schedule_steps < 100_000


def test_recipe_presets_and_data_defaults():
    """``morse`` in the registry: preset "cpu" by default, "paper" widths; the backbone follows
    the data (3D: unet3d, 2D: unet) unless given; 3D batches of 2 crops; variant and backbone are
    fields (``morse:VARIANT:BACKBONE``)."""
    assert RECIPE.default_preset(2) == RECIPE.default_preset(3) == "cpu" and set(RECIPE.presets) == {"cpu", "paper"}
    two, three = RECIPE.make("cpu", 2, {}), RECIPE.make("cpu", 3, {})
    assert (two.backbone, two.variant, two.batch_size, two.moe_dim) == ("unet", "morse", 4, 16)
    assert (three.backbone, three.batch_size) == ("unet3d", 2)
    paper = RECIPE.make("paper", 3, {"variant": "pointrend", "backbone": "unetr"})
    assert (paper.backbone, paper.variant, paper.backbone_preset, paper.moe_dim, paper.dropout_warmup_steps) == \
        ("unetr", "pointrend", "paper", 256, 0)
    assert morse_config(spatial_ndim=3) == three
