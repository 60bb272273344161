"""torchrun with gloo and 2 CPU processes: DDP, sharded latents, all-reduced meta-gradients and
sharded segmentation give what one process gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_blobs
from inrseg.data.layouts import open_dataset
from inrseg.methods.supervised import SupervisedConfig, SupervisedSegmenter

DIST = Path(__file__).parent / "dist"


def torchrun(script: str | Path, *args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --standalone --nproc-per-node nproc`` (gloo on the CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *(str(a) for a in args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", INRSEG_QUIET="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def _null_gradient_params(model: SupervisedSegmenter, ds) -> set[str]:
    """Names of the parameters whose gradient on a training batch is 0 up to rounding."""
    from monai.losses import DiceCELoss

    img, lab = ds.train[0].load()
    x = model._prepare(img)[None]
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
    cfg = SupervisedConfig(channels=(4, 8, 16), num_res_units=1, batch_size=4, steps=3,
                           val_every=1000, lr=1e-2, warmup=1)
    single = SupervisedSegmenter(ds.label_names, 2, 1, cfg, device="cpu")
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
    from inrseg.data.io import load_labels

    for name in names:
        assert (load_labels(one / name).data == load_labels(two / name).data).all()
