"""torchrun with gloo and 2 CPU processes: DDP, sharded latents, all-reduced meta-gradients and
sharded segmentation give what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_blobs
from inrseg.data.layouts import open_dataset
from inrseg.methods.morse import MORSE, morse_config
from inrseg.methods.unet import UNetConfig, UNetSegmenter

DIST = Path(__file__).parent / "dist"


def torchrun(script: str | Path, *args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --standalone --nproc-per-node nproc`` (gloo on the CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *(str(a) for a in args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", INRSEG_QUIET="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def _null_gradient_params(model: UNetSegmenter, ds) -> set[str]:
    """Names of the parameters whose gradient on a training batch is 0 up to rounding."""
    from monai.losses import DiceCELoss

    img, lab = ds.train[0].load()
    x = model.prepare(img)[None]
    y = torch.from_numpy(lab.data.astype("int64"))[None, None]
    loss = DiceCELoss(to_onehot_y=True, softmax=True)(model.net(x), y)
    named = list(model.net.named_parameters())
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {k for (k, _), g in zip(named, grads) if float(g.abs().max()) < 1e-6}


def test_ddp_unet_equals_one_process_on_the_union_of_batches(tmp_path):
    data = write_blobs(tmp_path / "ds", n=6, shape=(32, 32))
    out = tmp_path / "ddp"
    out.mkdir()
    torchrun(DIST / "ddp_unet.py", data, out, 3, 2)
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    ds = open_dataset(data)
    cfg = UNetConfig(channels=(4, 8, 16), num_res_units=1, batch_size=4, steps=3, val_every=1000, lr=1e-2,
                     warmup=1)
    single = UNetSegmenter(ds.label_names, 2, 1, cfg, device="cpu")
    init = {k: v.clone() for k, v in single.net.state_dict().items()}
    # A conv bias followed by instance norm has a gradient that is 0 up to rounding; Adam
    # divides it by its own size, so these biases move by +-lr in a rounding-dependent
    # direction in any two runs that sum in another order. Everything else must agree.
    null = _null_gradient_params(single, ds)
    assert null and all(k.endswith(".bias") for k in null)
    single.fit(ds.train, None)
    moved = 0.0
    for k, v in single.net.state_dict().items():
        if k in null:
            continue
        torch.testing.assert_close(r0[k], v, rtol=1e-4, atol=1e-5, msg=f"DDP and 1 process differ on {k}")
        moved = max(moved, float((v.float() - init[k].float()).abs().max()))
    assert moved > 1e-3  # the comparison is not between two untrained networks
    log = (out / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 3  # rank 0 alone writes the metrics log


def test_segment_under_two_ranks_writes_each_output_once_and_as_one_rank(tmp_path, cli):
    data = write_blobs(tmp_path / "ds", n=5, shape=(32, 32))
    model = tmp_path / "unet.safetensors"
    assert cli("train", "unet", "--data", data, "--out", model, "--steps", "2", "--device", "cpu").code == 0
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli("segment", "--model", model, "--input", data / "imagesTr", "--output", one,
               "--device", "cpu").code == 0
    rec = tmp_path / "rec"
    rec.mkdir()
    torchrun(DIST / "segment_cli.py", rec, "--", "--model", model, "--input", data / "imagesTr",
             "--output", two, "--device", "cpu")
    writes = [(r, name) for r in (0, 1) for name in (rec / f"writes-rank{r}.txt").read_text().split()]
    names = [n for _, n in writes]
    assert sorted(names) == sorted(p.name for p in one.glob("*.nii.gz")) and len(names) == 5
    assert {r for r, _ in writes} == {0, 1}  # both ranks worked
    from inrseg.data.nifti import load_labels

    for name in names:
        assert (load_labels(one / name).data == load_labels(two / name).data).all()


def _morse_null_gradient_params(model: MORSE, ds) -> set[str]:
    """Names of the parameters whose gradient on a training batch, with ``L_rend`` on, is 0 up
    to rounding but not exactly 0 (the point head's hidden layers start with an exact 0
    gradient: its predictor starts as the identity on the coarse logits)."""
    from monai.losses import DiceCELoss

    img, lab = ds.train[0].load()
    x = model.prepare(img)[None]
    y = torch.from_numpy(lab.data.astype("int64"))[None, None]
    loss, _ = model.losses(model.net, x, y, 1.0, DiceCELoss(to_onehot_y=True, softmax=True))
    named = list(model.net.named_parameters())
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {k for (k, _), g in zip(named, grads) if 0 < float(g.abs().max()) < 1e-6}


def test_ddp_morse_equals_one_process_on_the_union_of_batches(tmp_path):
    """MORSE ("iar": a U-Net and an implicit rendering head) on 2 ranks x 1 item equals 1 process
    x 2 items, L_rend included (T = 4: steps 3 and 4 train the point head, which DDP sees unused
    in steps 1 and 2): crops and training points are draws of (seed, step, item)."""
    data = write_blobs(tmp_path / "ds", n=4, shape=(16, 16))
    out = tmp_path / "ddp"
    out.mkdir()
    torchrun(DIST / "ddp_morse.py", data, out, 4, 1)
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    ds = open_dataset(data)
    cfg = morse_config("unet", "iar", 2, backbone_overrides={"channels": (4, 8, 16), "num_res_units": 1},
                       point_width=16, fourier_frequencies=8, train_points=64, test_points=64,
                       batch_size=2, steps=4, val_every=1000, lr=1e-2)
    single = MORSE(ds.label_names, 2, 1, cfg, device="cpu")
    init = {k: v.clone() for k, v in single.net.state_dict().items()}
    null = _morse_null_gradient_params(single, ds)  # see the U-Net test: biases before instance norm
    assert null and all(k.startswith("backbone.") and k.endswith(".bias") for k in null)
    single.fit(ds.train, None)
    assert single.rend_steps == 2
    for r in (0, 1):
        assert json.loads((out / f"rank{r}.json").read_text())["rend_steps"] == 2
    moved = {"backbone": 0.0, "point_head": 0.0, "fourier": 0.0}
    for k, v in single.net.state_dict().items():
        if k in null:
            continue
        torch.testing.assert_close(r0[k], v, rtol=1e-4, atol=1e-5, msg=f"DDP and 1 process differ on {k}")
        part = k.split(".")[0]
        moved[part] = max(moved[part], float((v.float() - init[k].float()).abs().max()))
    assert min(moved.values()) > 1e-3, moved  # every part trained, the point head and B included
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4]  # rank 0 alone writes the metrics log
    assert ["loss_rend" in e for e in log] == [False, False, True, True]


def test_metaseg_all_reduced_meta_gradient_equals_one_process_on_the_same_tasks(tmp_path):
    """MetaSeg meta-training on 2 ranks x 1 task: the engine's all-reduced second-order
    meta-gradient (Meta-SGD learning rates included, float64) equals one process's on the same
    2 tasks (each task is a draw of (seed, step, task index)). A whole 2-rank fit ends with the
    same model on both ranks."""
    import importlib.util

    data = write_blobs(tmp_path / "ds", n=4, shape=(16, 16))
    out = tmp_path / "grad"
    out.mkdir()
    torchrun(DIST / "metaseg_grad.py", data, out, 1)
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    spec = importlib.util.spec_from_file_location("metaseg_grad", DIST / "metaseg_grad.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    single, first_task = script.meta_gradients(data, 2), script.meta_gradients(data, 1)
    assert set(r0) == set(single) and any(k.startswith("lr.") for k in single)
    for k in single:
        assert single[k].dtype == torch.float64
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
        torch.testing.assert_close(r0[k], single[k], rtol=1e-9, atol=1e-13, msg=f"2 ranks and 1 process differ on {k}")
    # the average is over both tasks: task 0's gradient alone is far from it
    gap = max(float((first_task[k] - single[k]).abs().max() / single[k].abs().max()) for k in single)
    assert gap > 1e-2
    # a whole fit: phase 2 and the choice of T_f ran on rank 0, and every rank ends with its result
    m0, m1 = load_file(str(out / "model0.safetensors")), load_file(str(out / "model1.safetensors"))
    assert set(m0) == set(m1) and all(torch.equal(m0[k], m1[k]) for k in m0)
    info = [json.loads((out / f"model{r}.json").read_text()) for r in (0, 1)]
    assert info[0] == info[1] and [e["t_f"] for e in info[0]["tf_curve"]] == [0, 3]


@pytest.mark.parametrize("augment", [0, 1])
def test_nisf_prior_with_latents_sharded_over_two_ranks(tmp_path, augment):
    """Rank r loads and trains the cases r::2 and their latents (with ``augment``, also its
    cases' copies: row c * n + i belongs to case i's rank); the saved table has each row once,
    in order, from the rank that trained it; a resumed run (latent Adam moments gathered into
    the state) matches an uninterrupted one."""
    from inrseg.methods.nisf import NISF, NISFConfig

    n, steps = 5, 30
    rows = n * (1 + augment)
    data = write_blobs(tmp_path / "ds", n=n, shape=(16, 16))
    out = tmp_path / "nisf"
    out.mkdir()
    torchrun(DIST / "nisf_shard.py", data, out, steps, augment)
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    for k in ranks[0]:
        if k.startswith("net."):
            assert torch.equal(ranks[0][k], ranks[1][k]), f"ranks disagree on {k}"
    saved = load_file(str(out / "full.safetensors"))["train_latents"]
    assert saved.shape == (rows, 32)
    init = NISF(["a"], 2, 1, NISFConfig(width=32, depth=3)).initial_train_latents(rows)
    for r, held in enumerate(ranks):
        assert held["own"].tolist() == [int(i % n % 2 == r) for i in range(rows)]
    for i in range(rows):
        owner, other = ranks[i % n % 2]["latents"], ranks[1 - i % n % 2]["latents"]
        assert torch.equal(saved[i], owner[i])          # the row its owner trained, once
        assert torch.equal(other[i], init[i])           # zero gradient, zero moments: never moved
        assert float((saved[i] - init[i]).abs().max()) > 1e-3
    assert float(torch.cdist(saved, saved).add(torch.eye(rows)).min()) > 1e-3   # rows all differ
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, steps + 1))
    losses = [e["loss"] for e in log]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    resumed = load_file(str(out / "resumed.safetensors"))
    for k, v in load_file(str(out / "full.safetensors")).items():
        torch.testing.assert_close(resumed[k], v, atol=1e-6, rtol=1e-5, msg=f"resume differs on {k}")
