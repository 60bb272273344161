"""MetaSeg: SIREN functional forward, second-order meta-gradient, training, T_f, resume, I/O.

Everything runs on tiny images (32 x 32) and tiny networks so the file stays fast on 2 cores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from inrseg.data.grids import resampled_affine
from inrseg.data.nifti import save_image, save_labels
from inrseg.data.volume import Volume
from inrseg.data.cases import Case
from inrseg.engine import Budget
from inrseg.methods.base import FitDiagnostics, Segmenter, StepCurves
from inrseg.methods.metaseg import PAPER_SETTINGS, PRESETS, RECIPE, MetaSeg, MetaSegConfig, fitting, inner, meta, phase2
from inrseg.methods.metaseg.inner import (ADAM_BETAS, ADAM_EPS, Task, focal_loss, inner_adapt, meta_loss, task_loss,
                                          weighted_mse)
from inrseg.methods.metaseg.meta import MetaTrainingTask, planned_outer_steps, validation_dice
from inrseg.methods.registry import load_segmenter
from inrseg.metrics import case_metrics
from inrseg.nn.siren import SirenSeg, full_forward, init_params, siren_forward

SHAPE = (32, 32)
NAMES = ["background", "cortex", "subcortical-grey-matter", "white-matter", "csf"]


def _images(n: int, seed0: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (image, labels) pairs: brain phantoms, or nested blobs if phantoms are unavailable."""
    try:
        from inrseg.data.phantoms.brain import brain_phantom
    except ImportError:  # pragma: no cover - fallback for a tree without phantoms
        brain_phantom = None
    out = []
    for i in range(n):
        if brain_phantom is not None:
            img, lab = brain_phantom(SHAPE, seed0 + i)
        else:  # pragma: no cover
            rng = np.random.default_rng(seed0 + i)
            yy, xx = np.mgrid[-1:1:32j, -1:1:32j]
            c = rng.uniform(-0.1, 0.1, 2)
            r = np.hypot(yy - c[0], xx - c[1]) * rng.uniform(0.9, 1.1)
            lab = np.select([r < 0.2, r < 0.4, r < 0.6, r < 0.75], [4, 2, 3, 1], 0).astype(np.uint8)
            img = np.choose(lab, [0.0, 0.25, 0.3, 0.38, 0.2]) + rng.normal(0, 0.01, SHAPE)
        out.append((img.astype(np.float32), lab.astype(np.uint8)))
    return out


def _write_cases(root: Path, pairs, prefix: str) -> list[Case]:
    cases = []
    affine = np.diag([1.5, 1.5, 1.0, 1.0])
    for i, (img, lab) in enumerate(pairs):
        like = Volume(lab, affine, 2)
        ip = save_image(img, root / f"{prefix}{i:02d}_0000.nii.gz", like=like)
        lp = save_labels(lab, root / f"{prefix}{i:02d}.nii.gz", like=like)
        cases.append(Case(f"{prefix}{i:02d}", f"{prefix}{i:02d}", (ip,), lp, 2, tuple(range(5))))
    return cases


def tiny_config(**kw) -> MetaSegConfig:
    base = dict(hidden=32, layers=3, steps=300, points_per_task=256, inner_lr=1e-3, outer_lr=1e-3,
                val_every=100, val_fit_steps=10, val_max_cases=2, tf_candidates=(10,), default_tf=10,
                fit_points=256, phase2_steps=0, phase2_points=256, val_points=256, seed=0)
    base.update(kw)
    return MetaSegConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one thread is several times faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("metaseg")
    pairs = _images(12, 100)
    return {"train": _write_cases(root, pairs[:8], "tr"), "val": _write_cases(root, pairs[8:10], "va"),
            "test": _write_cases(root, pairs[10:], "te")}


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(0)
    model = MetaSeg(NAMES, 2, 1, tiny_config())
    model.fit(data["train"], data["val"])
    return model


def _dice(model: MetaSeg, cases) -> float:
    scores = []
    for c in cases:
        img, lab = c.load()
        scores.append(case_metrics(model.predict(img).data, lab.data, 5, distances=False).mean_foreground_dice)
    return float(np.mean(scores))


# -------------------------------------------------------------------------------- network
def test_siren_functional_forms_agree():
    torch.manual_seed(0)
    net = SirenSeg(2, 1, 16, 4, 5)
    params = {k: v.detach().clone() for k, v in net.state_dict().items()}
    x = torch.rand(50, 2) * 2 - 1
    out, logits = full_forward(params, x)
    assert out.shape == (50, 1) and logits.shape == (50, 5)
    out2, logits2 = torch.func.functional_call(net, params, (x,))
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(logits, logits2)
    # stacked parameters (B = 2) give each image its own network
    other = init_params(2, 1, 16, 4, 5, generator=torch.Generator().manual_seed(1))
    stacked = {k: torch.stack([params[k], other[k]]) if k.startswith("f.") else params[k] for k in params}
    o_b, l_b = full_forward(stacked, x.expand(2, -1, -1))
    o_1, _ = full_forward({**other, **{k: params[k] for k in params if k.startswith("g.")}}, x)
    torch.testing.assert_close(o_b[0], out)
    torch.testing.assert_close(o_b[1], o_1)
    assert l_b.shape == (2, 50, 5)


def test_wider_deeper_head_option():
    net = SirenSeg(2, 1, 16, 4, 5, head_hidden=32, head_layers=3)
    params = {k: v.detach().clone() for k, v in net.state_dict().items()}
    assert params["g.0.weight"].shape == (32, 16) and params["g.4.weight"].shape == (5, 32)
    assert set(params) == set(init_params(2, 1, 16, 4, 5, head_hidden=32, head_layers=3))
    x = torch.rand(40, 2) * 2 - 1
    out, logits = full_forward(params, x)
    out2, logits2 = torch.func.functional_call(net, params, (x,))
    torch.testing.assert_close(logits, logits2)
    # the default head is the paper's Linear(h, h) -> LeakyReLU -> Linear(h, C)
    assert {k for k in init_params(2, 1, 16, 4, 5) if k.startswith("g.")} == {
        "g.0.weight", "g.0.bias", "g.2.weight", "g.2.bias"}


def test_preset_parameter_counts():
    counts = {}
    for name, classes, nd in (("2d-seg4", 5, 2), ("2d-seg24", 25, 2), ("3d-seg4", 5, 3)):
        cfg = MetaSegConfig(**PRESETS[name], steps=0)
        counts[name] = MetaSeg([str(i) for i in range(classes)], nd, 1, cfg).num_params
    assert 82_000 < counts["2d-seg4"] < 85_000          # paper: 83K
    assert 1_050_000 < counts["2d-seg24"] < 1_070_000   # paper: 1.06M
    assert 325_000 < counts["3d-seg4"] < 335_000        # paper: 330K


def test_recipe_presets_and_default_preset():
    """The registry's recipe: 3d-seg4 on 3D data, 2d-seg4 on 2D; each ``*-paper`` preset is its
    network preset with the published settings on top; overrides win."""
    assert RECIPE.config_class is MetaSegConfig
    assert RECIPE.default_preset(3) == "3d-seg4" and RECIPE.default_preset(2) == "2d-seg4"
    for name in ("2d-seg4", "2d-seg24", "3d-seg4"):
        paper = RECIPE.make(f"{name}-paper", 2, {"seed": 4})
        assert paper == dataclasses.replace(MetaSegConfig(**PRESETS[name]), **PAPER_SETTINGS, seed=4)
        assert paper.hidden == PRESETS[name]["hidden"] and paper.points_per_task is None
        assert paper.head_context == 0.0 and paper.outer_schedule == "constant" and paper.steps == 5000
    assert RECIPE.make("3d-seg4", 3, {"steps": 7}) == MetaSegConfig(**PRESETS["3d-seg4"], steps=7)


@pytest.mark.parametrize("inner_loss", ["pixels", "joint"])
def test_second_order_meta_gradient_matches_finite_differences(inner_loss):
    cfg = MetaSegConfig(hidden=6, layers=3, inner_steps=2, inner_lr=1e-2, w0=30.0, inner_loss=inner_loss)
    g = torch.Generator().manual_seed(0)
    params = init_params(2, 1, 6, 3, 3, generator=g, dtype=torch.float64)
    params = {k: v.requires_grad_(True) for k, v in params.items()}

    def task(seed: int) -> Task:
        gg = torch.Generator().manual_seed(seed)
        return Task(torch.rand(40, 2, generator=gg, dtype=torch.float64) * 2 - 1,
                    torch.rand(40, 1, generator=gg, dtype=torch.float64),
                    torch.randint(3, (40,), generator=gg))

    support, query = [task(1), task(2)], task(3)
    loss = meta_loss(params, support, query, cfg, create_graph=True)
    grads = torch.autograd.grad(loss, list(params.values()))
    direction = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    analytic = sum((gr * direction[k]).sum() for gr, k in zip(grads, params))
    # Adam's normalised first steps are very non-linear in the gradient: central differences
    # need a tiny step (float64 keeps the rounding error ~1e-8 relative)
    eps = 1e-8

    def at(sign: float) -> float:
        moved = {k: (v.detach() + sign * eps * direction[k]).requires_grad_(True) for k, v in params.items()}
        return float(meta_loss(moved, support, query, cfg, create_graph=False).detach())

    numeric = (at(1.0) - at(-1.0)) / (2 * eps)
    assert abs(float(analytic) - numeric) < 1e-5 * max(1.0, abs(numeric))
    # first-order MAML drops the second-order terms: a different gradient
    fo = torch.autograd.grad(meta_loss(params, support, query, cfg, create_graph=False), list(params.values()))
    fo_dir = sum((gr * direction[k]).sum() for gr, k in zip(fo, params))
    assert abs(float(fo_dir) - numeric) > 1e-3


def _random_task(seed: int, n: int = 40, classes: int = 3) -> Task:
    g = torch.Generator().manual_seed(seed)
    return Task(torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1,
                torch.rand(n, 1, generator=g, dtype=torch.float64),
                torch.randint(classes, (n,), generator=g))


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_focal_loss_is_the_formula_and_twice_differentiable(gamma):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(64, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(5, (64,), generator=g)

    def formula(z: torch.Tensor) -> torch.Tensor:  # -(1 - p_t)^gamma log p_t, averaged over points
        p_t = torch.stack([torch.softmax(z[i], 0)[target[i]] for i in range(len(target))])
        return (-((1 - p_t) ** gamma) * torch.log(p_t)).mean()

    ours = focal_loss(logits, target, gamma)
    assert ours.dtype == torch.float64 and ours.shape == ()
    torch.testing.assert_close(ours, formula(logits), rtol=1e-12, atol=0)
    if gamma == 0:
        torch.testing.assert_close(ours, torch.nn.functional.cross_entropy(logits, target), rtol=1e-12, atol=0)
    # gradients and Hessian-vector products (what second-order MAML differentiates) agree too
    v = torch.randn(logits.shape, generator=g, dtype=torch.float64)
    derivatives = []
    for f in (lambda z: focal_loss(z, target, gamma), formula):
        (grad,) = torch.autograd.grad(f(logits), logits, create_graph=True)
        (hvp,) = torch.autograd.grad((grad * v).sum(), logits)
        derivatives.append((grad.detach(), hvp))
    for a, b in zip(*derivatives):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert float(derivatives[0][1].abs().max()) > 1e-3


def test_inner_adam_equals_torch_adam_step_for_step(monkeypatch):
    cfg = MetaSegConfig(hidden=8, layers=3, inner_lr=1e-2, inner_loss="pixels")   # theta only
    params = {k: v.requires_grad_(True) for k, v in
              init_params(2, 1, 8, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).items()}
    support = [_random_task(s) for s in range(1, 6)]
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items() if k.startswith("f.")}
    opt = torch.optim.Adam(theta.values(), lr=cfg.inner_lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    reference = []  # torch.optim.Adam after 1, 2, ... steps, each on the gradient at its current point
    for task in support:
        opt.zero_grad()
        weighted_mse(siren_forward(theta, task.coords, cfg.w0)[0], task.pixels, task.weight).backward()
        opt.step()
        reference.append({k: v.detach().clone() for k, v in theta.items()})

    def largest_gap() -> float:
        gaps = []
        for n, ref in enumerate(reference, 1):
            adapted = inner_adapt(params, support[:n], cfg, create_graph=False)
            gaps += [float((adapted[k].detach() - ref[k]).abs().max()) for k in ref]
            assert all(torch.equal(adapted[k], params[k]) for k in params if k.startswith("g."))
        return max(gaps)

    assert largest_gap() < 1e-12  # steps of lr 1e-2: equal up to float64 rounding
    # the comparison sees Adam's bias correction: without it the first step is ~3x too long
    monkeypatch.setattr(inner, "adam_direction", lambda m, v, t: m / ((v + 1e-30).sqrt() + ADAM_EPS))
    assert largest_gap() > 1e-3


def test_test_time_adam_equals_torch_adam_step_for_step(monkeypatch):
    """The test-time fit (fit_theta, all pixels per step) is torch.optim.Adam on the image's
    MSE, step for step, for theta only; and the comparison sees a missing bias correction or a
    wrong moment update inside fit_theta."""
    cfg = MetaSegConfig(hidden=8, layers=3, inner_lr=1e-3, fit_points=None, chunk=100_000)
    model = MetaSeg(["background", "a", "b"], 2, 1, cfg, device="cpu")
    rng = np.random.default_rng(0)
    image = Volume(rng.random((1, 12, 10)).astype(np.float32), np.eye(4), 2)
    im = model.prepare(image)
    theta = {k: model.params[k].detach().clone().requires_grad_(True) for k in model.theta_keys}
    opt = torch.optim.Adam(theta.values(), lr=cfg.inner_lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    reference = {}
    for t in range(1, 6):
        opt.zero_grad()
        weighted_mse(siren_forward(theta, im.coords, cfg.w0)[0], im.pixels, None).backward()
        opt.step()
        reference[t] = {k: v.detach().clone() for k, v in theta.items()}

    def largest_gap() -> float:
        gap = 0.0
        for t, fitted in model.fit_theta([im], 5, snapshots=range(1, 6)):
            if t in reference:
                gap = max(gap, max(float((fitted[k][0] - reference[t][k]).abs().max()) for k in reference[t]))
        return gap

    assert largest_gap() < 2e-6
    monkeypatch.setattr(fitting, "adam_direction", lambda m, v, t: m / ((v + 1e-30).sqrt() + ADAM_EPS))
    assert largest_gap() > 1e-4


# -------------------------------------------------------------------------------- training
def test_meta_training_beats_random_init(trained, data):
    assert isinstance(trained, Segmenter)
    random_init = MetaSeg(NAMES, 2, 1, dataclasses.replace(trained.config, steps=0))
    random_init.t_f = trained.t_f
    d_meta, d_rand = _dice(trained, data["test"]), _dice(random_init, data["test"])
    print(f"meta-trained Dice {d_meta:.3f}, random init {d_rand:.3f}")
    assert d_meta > d_rand + 0.15, (d_meta, d_rand)
    assert trained.t_f == 10 and trained.best_step is not None
    # without phase 2 the T_f curve is the meta-learned head's
    assert isinstance(trained, StepCurves)
    assert trained.steps_curve() == [(10, trained.tf_curve[0]["val_dice_meta_head"])]
    assert trained.chosen_settings() == {"best_step": trained.best_step, "t_f": 10}
    assert [h["step"] for h in trained.history] == [100, 200, 300]


def test_phase2_head_retraining_and_tf_choice(trained, data):
    model = MetaSeg(NAMES, 2, 1, dataclasses.replace(trained.config, steps=0, phase2_steps=60,
                                                    phase2_val_every=20, tf_candidates=(0, 5, 10)))
    model.params = {k: v.clone() for k, v in trained.params.items()}
    train_s = [model.prepare(*c.load()) for c in data["train"]]
    val_s = [model.prepare(*c.load()) for c in data["val"]]
    model.select_tf_and_head(train_s, val_s)
    assert [e["t_f"] for e in model.tf_curve] == [0, 5, 10]
    assert model.t_f in (0, 5, 10)
    for e in model.tf_curve:  # best-on-validation head, starting from phi*: never worse
        assert e["val_dice_phase2"] >= e["val_dice_meta_head"] - 1e-9
    best = max(e["val_dice_phase2"] for e in model.tf_curve)
    assert [e["val_dice_phase2"] for e in model.tf_curve if e["t_f"] == model.t_f] == [best]
    assert model.steps_curve() == [(e["t_f"], e["val_dice_phase2"]) for e in model.tf_curve]
    # only the head changed in phase 2
    for k in trained.params:
        if k.startswith("f."):
            assert torch.equal(model.params[k], trained.params[k])


def test_resume_continues_from_saved_step(data, tmp_path):
    state = tmp_path / "m.train-state"
    cfg = tiny_config(steps=20, val_every=10, tf_candidates=(5,))
    first = MetaSeg(NAMES, 2, 1, cfg)
    first.fit(data["train"][:3], data["val"][:1], state_path=state)
    assert state.exists() and first.start_step == 0
    second = MetaSeg(NAMES, 2, 1, dataclasses.replace(cfg, steps=40))
    second.fit(data["train"][:3], data["val"][:1], state_path=state)
    assert second.start_step == 20
    assert [h["step"] for h in second.history] == [10, 20, 30, 40]
    assert second.history[:2] == first.history
    # the resumed run keeps the schedule it started with (its length travels with the state)
    assert first.timings["schedule_steps"] == 20 and second.timings["schedule_steps"] == 20


# -------------------------------------------------------------------------------- inference
def test_save_load_identical_predictions(trained, data, tmp_path):
    path = tmp_path / "metaseg.safetensors"
    trained.save(path)
    loaded = load_segmenter(path, method="metaseg")
    assert isinstance(loaded, MetaSeg) and loaded.t_f == trained.t_f
    assert loaded.config == trained.config
    img, _ = data["test"][0].load()
    np.testing.assert_array_equal(loaded.predict(img).data, trained.predict(img).data)


def test_predict_2x_and_points(trained, data):
    img, _ = data["test"][0].load()
    pred = trained.predict(img, scale=2.0)
    assert pred.data.shape == (64, 64) and pred.data.dtype == np.int64
    np.testing.assert_allclose(pred.affine, resampled_affine(img.affine, img.shape, (64, 64)))
    assert trained.predict(img).data.shape == SHAPE
    pts = trained.predict_points(img, np.array([[0.0, 0.0], [-0.9, 0.9], [0.5, -0.2]]))
    assert pts.shape == (3,) and pts.min() >= 0 and pts.max() < 5


def test_only_theta_changes_at_test_time(trained, data):
    before = {k: v.clone() for k, v in trained.params.items()}
    img, _ = data["test"][0].load()
    trained.predict(img)
    for k in before:  # the model itself is untouched by test-time fitting
        assert torch.equal(before[k], trained.params[k])
    *_, (t, theta) = trained.fit_theta([trained.prepare(img)], 5)
    assert t == 5 and set(theta) == {k for k in before if k.startswith("f.")}  # no head in the fit
    assert any(not torch.equal(theta[k][0], before[k]) for k in theta)


def test_batched_fitting_equals_one_at_a_time(trained, data):
    model = MetaSeg(NAMES, 2, 1, dataclasses.replace(trained.config, fit_points=None))
    model.params = trained.params
    ims = [model.prepare(c.load_image()) for c in data["test"]]
    *_, (_, both) = model.fit_theta(ims, 8)
    for j, im in enumerate(ims):
        *_, (_, one) = model.fit_theta([im], 8)
        for k in one:
            torch.testing.assert_close(both[k][j], one[k][0], rtol=1e-4, atol=1e-5)


def test_meta_sgd_learns_and_stores_inner_learning_rates(data, tmp_path):
    cfg = tiny_config(steps=6, val_every=3, meta_sgd=True, first_order_steps=3, meta_batch=2,
                      tf_candidates=(3,))
    model = MetaSeg(NAMES, 2, 1, cfg)
    model.fit(data["train"][:3], data["val"][:1])
    assert model.lrs is not None
    theta_lrs = torch.cat([v.reshape(-1) for k, v in model.lrs.items() if k.startswith("f.")])
    assert not torch.allclose(theta_lrs, torch.full_like(theta_lrs, cfg.inner_lr))
    model.save(tmp_path / "msgd.safetensors")
    loaded = MetaSeg.load(tmp_path / "msgd.safetensors")
    for k in model.lrs:
        assert torch.equal(loaded.lrs[k], model.lrs[k])
    img, _ = data["test"][0].load()
    np.testing.assert_array_equal(loaded.predict(img).data, model.predict(img).data)


# -------------------------------------------------------------------------------- budget, devices
def test_budget_bounds_the_whole_fit(data):
    """Meta-training stops early enough for phase 2 and the choice of T_f to end by the deadline
    (head retraining that would run far longer stops there too)."""
    cfg = tiny_config(steps=10 ** 6, val_every=50, tf_candidates=(20, 40), phase2_steps=10 ** 6,
                      phase2_val_every=50)
    model = MetaSeg(NAMES, 2, 1, cfg)
    budget = Budget(0.1)
    model.fit(data["train"][:4], data["val"], budget=budget)
    assert budget.elapsed_s() < 6.0 + 1.5
    assert 0.25 <= model.timings["meta_share"] <= 0.95
    assert model.timings["meta_train_s"] < 6.0 * model.timings["meta_share"] + 0.5
    assert model.history and model.history[-1]["step"] < cfg.steps
    assert model.tf_curve and model.t_f in (20, 40)


def test_a_budget_fits_the_outer_lr_schedule_to_the_steps_it_allows(trained, data, monkeypatch):
    """With a budget, meta-training plans T = the steps that fit (timed: here a fixed 10 ms per
    task and per validation, so T = 0.9 x seconds / 10.1 ms), and the outer lr's warm-up and
    cosine decay run over T (the warm-up scaled by T / steps): the lr reaches 0 at the last
    step the budget allows instead of being cut off high."""
    model = MetaSeg(NAMES, 2, 1, dataclasses.replace(trained.config, steps=5000, outer_warmup=250,
                                                    outer_schedule="cosine", val_every=100))
    train_s = [model.prepare(*c.load()) for c in data["train"][:2]]
    val_s = [model.prepare(*c.load()) for c in data["val"]]
    monkeypatch.setattr(meta, "seconds_per_call", lambda fn, device, calls=3: 0.01)
    assert planned_outer_steps(model, train_s, val_s, Budget(None)) == 5000
    assert planned_outer_steps(model, train_s, val_s, Budget(2.0)) == 5000          # 10,693 fit
    total = planned_outer_steps(model, train_s, val_s, Budget(0.5))
    assert 2600 <= total <= int(0.9 * 30 / 0.0101)
    factor = MetaTrainingTask(model, train_s, val_s, total=1000).schedulers[0].lr_lambdas[0]
    assert factor(0) == pytest.approx(1 / 50) and factor(49) == pytest.approx(1.0)
    assert factor(525) == pytest.approx(0.5, abs=1e-3) and factor(999) < 1e-4
    default = MetaTrainingTask(model, train_s, val_s).schedulers[0].lr_lambdas[0]
    assert default(249) == pytest.approx(1.0) and default(2625) == pytest.approx(0.5, abs=1e-3)


def test_phase2_past_its_deadline_does_the_least(trained, data):
    model = MetaSeg(NAMES, 2, 1, dataclasses.replace(trained.config, steps=0, phase2_steps=50,
                                                    tf_candidates=(0, 5, 10)))
    model.params = {k: v.clone() for k, v in trained.params.items()}
    train_s = [model.prepare(*c.load()) for c in data["train"]]
    val_s = [model.prepare(*c.load()) for c in data["val"]]
    model.select_tf_and_head(train_s, val_s, Budget(1e-6))  # expired by the time it is used
    assert [e["t_f"] for e in model.tf_curve] == [0] and model.t_f == 0
    # the fits themselves stop at the first candidate: no 400-step fit after the deadline
    model.config = dataclasses.replace(model.config, tf_candidates=(5, 10, 400))
    reached = []
    fit_theta = model.fit_theta

    def recording(*args, **kwargs):
        for t, theta in fit_theta(*args, **kwargs):
            reached.append(t)
            yield t, theta

    model.fit_theta = recording
    model.select_tf_and_head(train_s, val_s, Budget(1e-6))
    assert max(reached) == 5 and [e["t_f"] for e in model.tf_curve] == [5]


def test_every_tensor_on_an_explicit_device(data, tmp_path):
    """With "meta" as the default device, a tensor made without an explicit device is a meta
    tensor and the first operation that needs its data fails: a small fit (validation, resume
    state, metrics log, Meta-SGD off and on), a resumed fit, predictions, the figures and a
    checkpoint round trip all run through on device="cpu"."""
    from inrseg.viz.figures import feature_pca_png

    img, lab = data["test"][0].load()
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        for meta_sgd in (False, True):
            cfg = tiny_config(steps=4, val_every=2, val_fit_steps=2, meta_sgd=meta_sgd, meta_batch=2,
                              first_order_steps=1, tf_candidates=(0, 3), phase2_steps=4, phase2_val_every=2)
            state = tmp_path / f"state-{meta_sgd}"
            model = MetaSeg(NAMES, 2, 1, cfg, device="cpu")
            model.fit(data["train"][:2], data["val"][:1], state_path=state, log_path=tmp_path / f"log-{meta_sgd}.jsonl")
            resumed = MetaSeg(NAMES, 2, 1, dataclasses.replace(cfg, steps=6), device="cpu")
            resumed.fit(data["train"][:2], data["val"][:1], state_path=state)
            assert resumed.start_step == 4
            for m in (model, resumed):
                assert all(v.device.type == "cpu" for v in m.params.values())
                assert m.lrs is None or all(v.device.type == "cpu" for v in m.lrs.values())
        assert resumed.predict(img).data.shape == SHAPE
        assert resumed.predict(img, scale=2.0).data.shape == (64, 64)
        assert resumed.predict_points(img, np.array([[0.0, 0.0], [0.5, -0.5]])).shape == (2,)
        assert [c["step"] for c in resumed.step_curve(img, lab, steps=(0, 2))] == [0, 2]
        rgb, labels = resumed.feature_components(img, steps=2)
        assert rgb.shape == (*SHAPE, 3) and labels.shape == SHAPE
        feature_pca_png(img, rgb, labels, tmp_path / "pca.png")
        resumed.save(tmp_path / "m.safetensors")
        loaded = MetaSeg.load(tmp_path / "m.safetensors", device="cpu")
        np.testing.assert_array_equal(loaded.predict(img).data, resumed.predict(img).data)
    finally:
        torch.set_default_device(before)


def test_inner_sgd_equals_torch_sgd_step_for_step():
    """``inner_optimizer="sgd"`` (Meta-SGD's update) is torch.optim.SGD on the same gradients."""
    cfg = MetaSegConfig(hidden=8, layers=3, inner_lr=3e-2, inner_optimizer="sgd", inner_loss="pixels")
    params = {k: v.requires_grad_(True) for k, v in
              init_params(2, 1, 8, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).items()}
    support = [_random_task(s) for s in range(1, 5)]
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items() if k.startswith("f.")}
    opt = torch.optim.SGD(theta.values(), lr=cfg.inner_lr)
    for n, task in enumerate(support, 1):
        opt.zero_grad()
        weighted_mse(siren_forward(theta, task.coords, cfg.w0)[0], task.pixels, task.weight).backward()
        opt.step()
        adapted = inner_adapt(params, support[:n], cfg, create_graph=False)
        for k, ref in theta.items():
            torch.testing.assert_close(adapted[k].detach(), ref.detach(), rtol=0, atol=1e-12)
    assert max(float((theta[k] - params[k]).detach().abs().max()) for k in theta) > 1e-3   # it moved


def test_meta_learned_init_beats_random_init_at_two_test_time_steps(trained, data):
    """The signature of a working meta-learned initialisation: after only 2 test-time steps its
    own (meta-learned) head already labels the validation images far better than a random one."""
    pairs = [c.load() for c in data["val"]]
    assert isinstance(trained, FitDiagnostics)
    diag = trained.diagnostic(pairs, (2,))
    assert set(diag) == {"meta-learned", "phase 2"}
    random_init = MetaSeg(NAMES, 2, 1, dataclasses.replace(trained.config, steps=0))
    rand = random_init.diagnostic(pairs, (2,))
    d_meta, d_rand = diag["meta-learned"][0]["dice"], rand["phase 2"][0]["dice"]
    print(f"Dice at T = 2: meta-learned {d_meta:.3f}, random init {d_rand:.3f}")
    assert d_meta > d_rand + 0.2, (d_meta, d_rand)


# -------------------------------------------------------------------------------- ignore label
def test_focal_loss_skips_unlabelled_pixels():
    """The focal loss over the labelled pixels equals the focal loss of the labelled subset; the
    logits (and the stored target) at unlabelled pixels change neither it nor its gradient. The
    task loss keeps the MSE on every pixel."""
    from inrseg.data.volume import IGNORE

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(64, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.randint(5, (64,), generator=g)
    labelled = torch.rand(64, generator=g) < 0.6
    sparse = torch.where(labelled, target, IGNORE)
    ours = focal_loss(logits, sparse, 2.0, labelled)
    torch.testing.assert_close(ours, focal_loss(logits[labelled], target[labelled], 2.0), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(ours, logits)
    other = torch.where(labelled[:, None], logits, 10 * torch.randn(logits.shape, generator=g, dtype=torch.float64))
    (grad2,) = torch.autograd.grad(focal_loss(other, sparse, 2.0, labelled), other)
    torch.testing.assert_close(grad2, grad, rtol=0, atol=1e-15)
    assert (grad[~labelled] == 0).all()
    assert focal_loss(logits, sparse, 2.0, torch.zeros_like(labelled)).item() == 0.0
    # task_loss: MSE on all pixels + focal on the labelled ones
    cfg = tiny_config()
    model = MetaSeg(NAMES, 2, 1, cfg)
    img, lab = _images(1, 7)[0]
    lab = lab.astype(np.int64)
    lab[:, :12] = 255
    im = model.prepare(Volume(img[None], np.eye(4), 2), Volume(lab, np.eye(4), 2, meta={"ignore_label": 255}))
    assert im.labelled is not None and int((~im.labelled).sum()) == 32 * 12 and (im.labels[~im.labelled] == IGNORE).all()
    task = im.task()
    out, lg = full_forward(model.params, task.coords, cfg.w0)
    want = weighted_mse(out, task.pixels, task.weight) + cfg.seg_weight * focal_loss(
        lg[task.labelled], task.labels[task.labelled], cfg.focal_gamma)
    torch.testing.assert_close(task_loss(model.params, task, cfg), want)
    sub = task.subset(100, np.random.default_rng(0))
    assert sub.labelled is not None and torch.equal(sub.labelled, sub.labels != IGNORE)


def test_sparse_labels_focal_phase2_and_validation(tmp_path):
    """MetaSeg on sparsely labelled images (left third 255, declared ignore): meta-training,
    phase 2 on labelled pixels only and the validation Dice over labelled pixels all run."""
    from inrseg.data.volume import IGNORE

    pairs = []
    for img, lab in _images(4, 300):
        lab = lab.copy()
        lab[:, :10] = 255
        pairs.append((img, lab))
    cases = [dataclasses.replace(c, label_values=tuple(range(5)), ignore_label=255)
             for c in _write_cases(tmp_path, pairs, "sp")]
    model = MetaSeg(NAMES, 2, 1, tiny_config(steps=4, val_every=2, phase2_steps=6, phase2_val_every=3,
                                             tf_candidates=(0, 2), val_fit_steps=2))
    model.fit(cases[:3], cases[3:])
    assert model.t_f in (0, 2) and all(np.isfinite(e["val_dice_phase2"]) for e in model.tf_curve)
    val = model.prepare(*cases[3].load())
    feats, labels, n = phase2.snapshot_features(model, [val], 64, [0], torch.Generator().manual_seed(0),
                                                Budget(None))
    assert n == 1 and labels.shape == (64,) and (labels != IGNORE).all()


# -------------------------------------------------------------------------------- context head
def test_context_head_reads_the_neighbouring_voxels_features(trained, data):
    """``head_context = 2``: the head's input at a voxel is the features of that voxel and of the
    voxels 2 away along each axis (order: itself, +axis 0, +axis 1, -axis 0, -axis 1), read off
    the INR at exactly those grid coordinates - on a non-square grid, so a swapped axis or a
    wrong voxel size shows."""
    model = MetaSeg(NAMES, 2, 1, dataclasses.replace(trained.config, head_context=2.0))
    model.params = {k: v.clone() for k, v in trained.params.items()}
    img = Volume(np.random.default_rng(0).random((1, 12, 20)).astype(np.float32), np.diag([1.5, 1.0, 1.0, 1.0]), 2)
    prep = model.prepare(img)
    theta = {k: v.unsqueeze(0) for k, v in model.params.items() if k.startswith("f.")}
    grid = model.features(theta, prep.coords)[0].reshape(12, 20, -1)           # (H, W, h)
    inputs = model.head_inputs(theta, prep.coords, prep.step, model.context_points)[0].reshape(12, 20, 5, -1)
    for i, j in [(5, 7), (2, 2), (9, 17)]:
        want = torch.stack([grid[i, j], grid[i + 2, j], grid[i, j + 2], grid[i - 2, j], grid[i, j - 2]])
        torch.testing.assert_close(inputs[i, j], want, atol=2e-5, rtol=1e-4)
    assert model.context_points == 5 and MetaSeg(NAMES, 3, 1, model.config).context_points == 7


def test_context_head_phase2_starts_at_phi_star_and_survives_save_load(trained, data, tmp_path):
    """Phase 2 with context: every candidate's head starts as phi* (zero weights on the
    neighbours' features) and keeps the best on validation, so it is never worse than phi*;
    the model predicts, saves and loads with its wider head."""
    cfg = dataclasses.replace(trained.config, steps=0, phase2_steps=60, phase2_val_every=20,
                              tf_candidates=(5, 10), head_context=2.0)
    model = MetaSeg(NAMES, 2, 1, cfg)
    model.params = {k: v.clone() for k, v in trained.params.items()}
    train_s = [model.prepare(*c.load()) for c in data["train"]]
    val_s = [model.prepare(*c.load()) for c in data["val"]]
    model.select_tf_and_head(train_s, val_s)
    for e in model.tf_curve:
        assert e["val_dice_phase2"] >= e["val_dice_meta_head"] - 1e-9
    assert any(e["val_dice_phase2"] > e["val_dice_meta_head"] for e in model.tf_curve)
    assert model.params["g.0.weight"].shape == (32, 5 * 32)
    assert model.meta_head["g.0.weight"].shape == (32, 32)
    img, _ = data["test"][0].load()
    pred = model.predict(img)
    path = tmp_path / "ctx.safetensors"
    model.save(path)
    loaded = MetaSeg.load(path)
    np.testing.assert_array_equal(loaded.predict(img).data, pred.data)
    # the head's extra columns are used: zeroing them changes the labels somewhere
    cut = dict(loaded.params)
    cut["g.0.weight"] = torch.cat([cut["g.0.weight"][:, :32], torch.zeros(32, 4 * 32)], 1)
    loaded.params = cut
    assert not np.array_equal(loaded.predict(img).data, pred.data)


@pytest.mark.parametrize("ndim,shape,spacing,k", [(2, (12, 20), (1.5, 1.0), 2.0), (3, (5, 2, 7), (1.0, 3.0, 2.0), 3.0)])
def test_image_logits_on_the_padded_grid_equal_the_pointwise_context_head(trained, ndim, shape, spacing, k):
    """:meth:`MetaSeg.image_logits` (features once on the grid padded by ``k`` voxels, the
    neighbours sliced out of it, axis-0 blocks of a few rows) equals :meth:`MetaSeg.logits` at
    every voxel's coordinates, for 2 stacked fits, a non-square anisotropic grid and an axis
    shorter than ``k`` (every neighbour along it lies in the padding)."""
    cfg = dataclasses.replace(trained.config, head_context=k, chunk=40)
    model = MetaSeg(NAMES, ndim, 1, cfg)
    gen = torch.Generator().manual_seed(0)
    h, P = cfg.hidden, 1 + 2 * ndim
    head = {k_: v for k_, v in model.params.items() if k_.startswith("g.")}
    head["g.0.weight"] = torch.randn(h, P * h, generator=gen) / (P * h) ** 0.5
    img = Volume(np.random.default_rng(0).random((1, *shape)).astype(np.float32),
                 np.diag([*spacing, 1.0]), ndim)
    prep = model.prepare(img)
    theta = {k_: torch.stack([v, v + 0.01 * torch.randn(v.shape, generator=gen)])
             for k_, v in model.params.items() if k_.startswith("f.")}
    want = model.point_logits(theta, prep.coords, head, prep.step)                   # (2, N, C)
    got = model.image_logits(theta, prep, head)
    assert got.shape == want.shape == (2, int(np.prod(shape)), len(NAMES))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(want[0], want[1], atol=1e-3)                     # the two fits differ


def test_validation_of_large_images_scores_fixed_random_voxels(trained, data):
    """Meta-training's validation Dice: whole images up to ``val_max_voxels`` (the same figure
    as case_metrics on the full label map), beyond it a fixed random subset - the same voxels
    at every call, and close to the whole-image figure when the subset is large."""
    val = [trained.prepare(*c.load()) for c in data["val"]]
    N = val[0].coords.shape[0]
    whole = validation_dice(trained, val, 10)
    theta = None
    for _, theta in trained.fit_theta(val[:1], 10):
        pass
    pred = trained.point_logits(theta, val[0].coords).argmax(-1)[0].reshape(val[0].shape).numpy()
    by_hand = case_metrics(pred, val[0].labels.reshape(val[0].shape).numpy(), len(NAMES), distances=False)
    assert validation_dice(trained, val[:1], 10) == pytest.approx(by_hand.mean_foreground_dice, abs=1e-9)
    sub = dataclasses.replace(trained.config, val_max_voxels=N // 2)
    model = MetaSeg(NAMES, 2, 1, sub)
    model.params = trained.params
    first, again = validation_dice(model, val, 10), validation_dice(model, val, 10)
    assert first == again and first != whole and abs(first - whole) < 0.05, (first, whole)
    small = dataclasses.replace(sub, val_max_voxels=64)
    model.config = small
    assert abs(validation_dice(model, val, 10) - whole) > 1e-6
