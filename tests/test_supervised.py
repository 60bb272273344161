"""The U-Net / SegResNet baselines on the shared CNN trainer, and its training crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_blobs
from inrseg.data.grids import resampled_affine
from inrseg.data.layouts import open_dataset
from inrseg.data.sampling import PatchSampler, training_patch
from inrseg.data.splits import split_by_subject
from inrseg.methods.base import Segmenter
from inrseg.methods.registry import load_segmenter
from inrseg.methods.unet import SegResNetSegmenter, UNetConfig, UNetSegmenter
from inrseg.metrics import case_metrics

TINY = dict(channels=(8, 16, 32), num_res_units=1, batch_size=4, val_every=20, lr=3e-3, warmup=5)


@pytest.fixture(scope="module")
def blobs2d(tmp_path_factory):
    return open_dataset(write_blobs(tmp_path_factory.mktemp("b2") / "ds", n=8))


def _dice(model, cases):
    return float(np.mean([case_metrics(model.predict(c.load_image()).data, c.load_labels().data, 3,
                                       distances=False).mean_foreground_dice for c in cases]))


def test_protocol_training_and_save_load(blobs2d, tmp_path):
    torch.manual_seed(0)
    train, val = split_by_subject(blobs2d.train, 0.25)
    model = UNetSegmenter(blobs2d.label_names, 2, 1, UNetConfig(**TINY, steps=60))
    assert isinstance(model, Segmenter)
    before = _dice(model, val)
    model.fit(train, val)
    after = _dice(model, val)
    assert after > 0.8 and after > before + 0.3, (before, after)
    assert model.best_step is not None and model.history
    model.save(tmp_path / "m.safetensors")
    again = load_segmenter(tmp_path / "m.safetensors")
    img = val[0].load_image()
    np.testing.assert_array_equal(model.predict(img).data, again.predict(img).data)


def test_resume_continues_from_saved_step(blobs2d, tmp_path):
    state = tmp_path / "m.train-state"
    train, val = split_by_subject(blobs2d.train, 0.25)
    first = UNetSegmenter(blobs2d.label_names, 2, 1, UNetConfig(**TINY, steps=20))
    first.fit(train, val, state_path=state)  # "killed" after 20 of 40 steps: the state remains
    assert [h["step"] for h in first.history] == [20]
    second = UNetSegmenter(blobs2d.label_names, 2, 1, UNetConfig(**TINY, steps=40))
    second.fit(train, val, state_path=state)
    assert [h["step"] for h in second.history] == [20, 40]


def test_2x_prediction_shape_and_affine(blobs2d):
    model = UNetSegmenter(blobs2d.label_names, 2, 1, UNetConfig(**TINY))
    img = blobs2d.train[0].load_image()
    out = model.predict(img, scale=2.0)
    assert out.shape == (64, 64)
    np.testing.assert_allclose(out.affine, resampled_affine(img.affine, (32, 32), (64, 64)))
    assert out.affine[0, 0] == pytest.approx(0.5)


def test_3d_sliding_window_and_segresnet(tmp_path):
    ds = open_dataset(write_blobs(tmp_path / "b3", n=3, shape=(20, 24, 28), spacing=2.0))
    cfg = UNetConfig(channels=(4, 8, 16), num_res_units=0, batch_size=1, patch_size=(16, 16, 16),
                     steps=2, val_every=2)
    model = UNetSegmenter(ds.label_names, 3, 1, cfg)
    model.fit(ds.train[:2], ds.train[2:])
    img = ds.train[0].load_image()
    out = model.predict(img)  # larger than the 16^3 patch -> sliding window
    assert out.shape == (20, 24, 28) and out.data.max() < 3
    np.testing.assert_allclose(out.affine, img.affine)
    seg = SegResNetSegmenter(ds.label_names, 3, 1, UNetConfig(arch="segresnet", init_filters=8,
                                                               patch_size=(16, 16, 16)))
    assert seg.predict(img).shape == (20, 24, 28)


def test_foreground_oversampling_of_crops():
    """fraction 1: every crop holds foreground; fraction 0: crops are centred on background
    (mostly empty here); image and label crops come from the same place."""
    image = torch.randn(1, 40, 40, 40)
    label = torch.zeros(40, 40, 40, dtype=torch.int64)
    label[30:33, 2:4, 35:38] = 2                       # a small lesion near a corner
    fg = PatchSampler([image], [label], (16, 16, 16), foreground_fraction=1.0, augment=False)
    x, y = fg.batch(0, range(32), torch.device("cpu"))
    assert x.shape == (32, 1, 16, 16, 16) and y.shape == (32, 1, 16, 16, 16)
    assert all((y[i] > 0).any() for i in range(32))
    uniform = PatchSampler([image], [label], (16, 16, 16), foreground_fraction=0.0, augment=False)
    _, y0 = uniform.batch(0, range(32), torch.device("cpu"))
    assert sum(bool((y0[i] > 0).any()) for i in range(32)) < 16
    same = PatchSampler([label[None].float()], [label], (16, 16, 16), foreground_fraction=1.0, augment=False)
    x1, y1 = same.batch(0, range(4), torch.device("cpu"))
    assert torch.equal(x1[:, 0].long(), y1[:, 0])


def test_sampler_items_are_pure_functions_of_seed_step_index():
    """Resume and DDP rely on it: item j of step s is the same whoever draws it, in any order."""
    image, label = torch.randn(1, 30, 30, 30), torch.randint(0, 3, (30, 30, 30))
    a = PatchSampler([image], [label], (16, 16, 16), 0.5, augment=True, seed=3)
    b = PatchSampler([image], [label], (16, 16, 16), 0.5, augment=True, seed=3)
    xa, ya = a.batch(5, [0, 1, 2, 3], torch.device("cpu"))
    xb, yb = b.batch(5, [2, 3], torch.device("cpu"))
    assert torch.equal(xa[2:], xb) and torch.equal(ya[2:], yb)
    assert not torch.equal(a.batch(6, [0], torch.device("cpu"))[0], xa[:1])


def test_intensity_augmentation_bounds():
    """x -> x * (1 + U(-0.1, 0.1)) + U(-0.1, 0.1): a constant image of 1 stays in [0.8, 1.2],
    and the draws span most of that range."""
    image, label = torch.ones(1, 16, 16), torch.zeros(16, 16, dtype=torch.int64)
    s = PatchSampler([image], [label], (16, 16), 0.0, augment=True)
    x, _ = s.batch(0, range(200), torch.device("cpu"))
    vals = x[:, 0, 0, 0]
    assert torch.allclose(x, vals[:, None, None, None].expand_as(x))   # one scale/shift per item
    assert vals.min() >= 0.8 - 1e-6 and vals.max() <= 1.2 + 1e-6
    assert vals.max() - vals.min() > 0.25


def test_training_patch_rounding():
    assert training_patch((160, 190), None, 16) == (160, 192)            # 2D: the whole slice
    assert training_patch((240, 240, 155), None, 16) == (96, 96, 96)     # 3D default, capped
    assert training_patch((240, 240, 155), (64, 64, 8), 16) == (64, 64, 32)  # >= 2 x divisor
    assert training_patch((40, 50, 20), (64, 64, 64), 16) == (48, 64, 32)    # volume smaller


# ----------------------------------------------------------------------------- ignore label


def _masked_dicece_reference(logits, target, ignore):
    """Dice + CE computed on the gathered annotated voxels: MONAI's Dice per image (over its own
    annotated voxels), CE the mean over every annotated voxel of the batch."""
    from monai.losses import DiceLoss

    dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")
    B, C = logits.shape[:2]
    flat_l, flat_t = logits.reshape(B, C, -1), target.reshape(B, 1, -1)
    per = []
    for b in range(B):
        keep = flat_t[b, 0] != ignore
        per.append(dice(flat_l[b:b + 1][..., keep], flat_t[b:b + 1][..., keep]).reshape(-1))
    keep = flat_t[:, 0] != ignore
    ce = torch.nn.functional.cross_entropy(flat_l.transpose(1, 2)[keep], flat_t[:, 0][keep])
    return torch.cat(per).mean() + ce


def test_masked_dicece_loss_skips_ignored_voxels():
    """Ignored voxels change neither the loss nor its gradient; the loss equals Dice + CE on the
    annotated voxels alone; without an ignore label it is MONAI's DiceCELoss exactly."""
    from monai.losses import DiceCELoss as MonaiDiceCE

    from inrseg.data.volume import IGNORE
    from inrseg.losses import DiceCELoss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 1, 6, 5, 4), generator=gen)
    ignored = torch.rand(target.shape, generator=gen) < 0.4
    ignored[1, :, :, :, :2] = True
    sparse = torch.where(ignored, IGNORE, target)
    loss_fn = DiceCELoss(IGNORE)

    def value_and_grad(lg):
        lg = lg.clone().requires_grad_(True)
        loss = loss_fn(lg, sparse)
        loss.backward()
        return loss.detach(), lg.grad

    loss, grad = value_and_grad(logits)
    assert loss.item() == pytest.approx(_masked_dicece_reference(logits, sparse, IGNORE).item(), rel=1e-10)
    other = torch.where(ignored.expand_as(logits), torch.randn(logits.shape, generator=gen, dtype=torch.float64) * 5,
                        logits)
    loss2, grad2 = value_and_grad(other)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(grad, grad2, rtol=0, atol=1e-15)
    assert (grad[ignored.expand_as(grad)] == 0).all()
    # no ignore label: MONAI's loss, bit for bit; nothing ignored: the same value either way
    monai = MonaiDiceCE(to_onehot_y=True, softmax=True)(logits, target)
    assert torch.equal(DiceCELoss(None)(logits, target), monai)
    assert loss_fn(logits, target).item() == pytest.approx(monai.item(), rel=1e-12)
    # a batch with nothing annotated: loss 0, no NaN
    assert loss_fn(logits, torch.full_like(target, IGNORE)).item() == 0.0


def test_sampler_with_ignore_crops_annotated_regions():
    """With ignored voxels the crop centres lie on annotated voxels (foreground = label > 0,
    never the ignore value), so every crop holds annotation; a case with none still crops."""
    from inrseg.data.volume import IGNORE

    image = torch.randn(1, 40, 40, 30)
    label = torch.full((40, 40, 30), IGNORE, dtype=torch.int64)
    label[..., 20:24] = 0                                   # annotated slices 20-23
    label[10:16, 10:16, 20:24] = 1
    for fraction in (0.0, 1.0):
        s = PatchSampler([image], [label], (16, 16, 8), fraction, augment=False, ignore=True)
        _, y = s.batch(0, range(16), torch.device("cpu"))
        assert all((y[i] != IGNORE).any() for i in range(16))
        if fraction == 1.0:
            assert all((y[i] == 1).any() for i in range(16))
    empty = PatchSampler([image], [torch.full_like(label, IGNORE)], (16, 16, 8), 0.5, augment=False, ignore=True)
    assert empty.item(0, 0)[1].shape == (1, 16, 16, 8)


@pytest.mark.parametrize("arch", ["unet", "segresnet"])
def test_every_tensor_on_an_explicit_device(tmp_path, arch):
    """With the default device set to "meta", any tensor made without a device is a meta tensor
    and the run fails: fit (3D crops, validation, resume state, metrics log) and predict (sliding
    window, scale 2) with device="cpu" must not make one."""
    ds = open_dataset(write_blobs(tmp_path / "b3", n=3, shape=(20, 24, 28), spacing=2.0))
    cfg = UNetConfig(arch=arch, channels=(4, 8, 16), num_res_units=0, init_filters=8, batch_size=1,
                     patch_size=(16, 16, 16), steps=2, val_every=2)
    torch.set_default_device("meta")
    try:
        model = UNetSegmenter(ds.label_names, 3, 1, cfg, device="cpu")
        model.fit(ds.train[:2], ds.train[2:], state_path=tmp_path / "m.train-state",
                  log_path=tmp_path / "m.metrics.jsonl")
        img = ds.train[0].load_image()
        assert model.predict(img).shape == (20, 24, 28)
        assert model.predict(img, scale=2.0).shape == (40, 48, 56)
    finally:
        torch.set_default_device(None)
    assert next(model.net.parameters()).device.type == "cpu"


def test_schedule_fits_the_budget(blobs2d, tmp_path):
    """A budget that ends training long before ``steps``: the warm-up and cosine decay run over
    the T that fits it (timed; recorded in the checkpoint) and training stops there;
    without a budget, or with ``fit_schedule_to_budget=False``, T stays ``steps``."""
    import json
    import math

    from inrseg.engine import Budget

    train, val = split_by_subject(blobs2d.train, 0.25)
    cfg = UNetConfig(**{**TINY, "val_every": 10}, steps=100_000)
    model = UNetSegmenter(blobs2d.label_names, 2, 1, cfg)
    log = tmp_path / "log.jsonl"
    model.fit(train, val, budget=Budget(0.1), log_path=log)
    T = model.schedule_steps
    assert 5 < T < 100_000
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    for e in entries:
        s = e["step"]
        want = cfg.lr * min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, T) / T))
        assert e["lr"] == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert entries[-1]["step"] <= T                      # training stops at the fitted T
    model.save(tmp_path / "m.safetensors")
    assert load_segmenter(tmp_path / "m.safetensors").schedule_steps == T
    plain = UNetSegmenter(blobs2d.label_names, 2, 1, UNetConfig(**TINY, steps=7))
    plain.fit(train[:2])
    assert plain.schedule_steps == 7
    off = UNetSegmenter(blobs2d.label_names, 2, 1, UNetConfig(**TINY, steps=100_000,
                                                              fit_schedule_to_budget=False))
    off.fit(train[:2], budget=Budget(0.02))
    assert off.schedule_steps == 100_000


def test_recipes_presets_and_data_defaults():
    """The registry's recipes: the default preset, 3D batches of 2 crops, an explicit ``steps``
    caps ``val_every``; unet and segresnet presets are their own."""
    from inrseg.methods.unet import PRESETS, SEGRESNET_RECIPE, UNET_RECIPE

    assert UNET_RECIPE.default_preset(2) == UNET_RECIPE.default_preset(3) == "unet-small"
    assert SEGRESNET_RECIPE.default_preset(3) == "segresnet"
    assert set(UNET_RECIPE.presets) == {"unet-small", "unet-paper"} and set(SEGRESNET_RECIPE.presets) == {"segresnet"}
    two = UNET_RECIPE.make("unet-small", 2, {})
    assert two == UNetConfig(channels=PRESETS["unet-small"]["channels"], mirror=True)
    three = UNET_RECIPE.make("unet-paper", 3, {"steps": 30})
    assert (three.batch_size, three.val_every, three.channels) == (2, 30, (32, 64, 128, 256, 512))
    assert UNET_RECIPE.make("unet-small", 3, {"batch_size": 5, "steps": 30, "val_every": 50}).val_every == 50
    seg = SEGRESNET_RECIPE.make("segresnet", 3, {})
    assert (seg.arch, seg.batch_size) == ("segresnet", 2)
    assert SegResNetSegmenter(["bg", "a"], 2, 1).config.arch == "segresnet"
