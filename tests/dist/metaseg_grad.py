"""Run under torchrun: one MetaSeg meta-training step through the engine (second order,
Meta-SGD, float64, outer lr 0, no clipping); save each rank's all-reduced meta-gradients. Then
a small whole fit (phase 2 and T_f on rank 0, broadcast): save each rank's model.

    torchrun --standalone --nproc-per-node 2 metaseg_grad.py DATA OUT_DIR META_BATCH_PER_RANK

:func:`meta_gradients` is also imported by the test, for the one-process reference.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from inrseg.data.layouts import open_dataset
from inrseg.methods.metaseg import MetaSeg, MetaSegConfig
from inrseg.methods.metaseg.meta import MetaTrainingTask
from inrseg.engine import LoopSettings, init_distributed, leave_distributed, run_training, world


def meta_gradients(data: Path, meta_batch: int) -> dict[str, torch.Tensor]:
    """Gradients (float64, averaged over ranks by the engine) of every meta-parameter and of the
    learned learning rates that the inner loop uses (``theta``'s, under ``lr.``), after the
    engine's step 0 with ``meta_batch`` tasks per rank."""
    ds = open_dataset(data)
    cfg = MetaSegConfig(hidden=16, layers=3, inner_steps=2, inner_lr=1e-2, points_per_task=64,
                        meta_batch=meta_batch, meta_sgd=True, outer_lr=0.0, grad_clip=None, seed=3)
    model = MetaSeg(ds.label_names, 2, 1, cfg, device="cpu")
    model.params = {k: v.double() for k, v in model.params.items()}
    model.lrs = {k: v.double() for k, v in model.lrs.items()}
    images = [model.prepare(*c.load()) for c in ds.train]
    train_s = [dataclasses.replace(im, coords=im.coords.double(), pixels=im.pixels.double()) for im in images]
    run_training(MetaTrainingTask(model, train_s, []), LoopSettings(steps=1, val_every=1))
    grads = {k: v.grad for k, v in model.params.items()}
    grads.update({f"lr.{k}": v.grad for k, v in model.lrs.items() if v.grad is not None})
    return grads


if __name__ == "__main__":
    torch.set_num_threads(1)
    data, out, meta_batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    init_distributed(torch.device("cpu"))
    grads = meta_gradients(data, meta_batch)
    rank = world()[0]
    save_file({k: v.contiguous() for k, v in grads.items()}, str(out / f"rank{rank}.safetensors"))
    ds = open_dataset(data)
    cfg = MetaSegConfig(hidden=16, layers=3, steps=4, val_every=2, val_fit_steps=2, points_per_task=64,
                        meta_batch=meta_batch, fit_points=64, tf_candidates=(0, 3), phase2_steps=6,
                        phase2_val_every=3, phase2_points=64, val_points=64, seed=3)
    model = MetaSeg(ds.label_names, 2, 1, cfg, device="cpu")
    model.fit(ds.train[:3], ds.train[3:])
    model.save(out / f"model{rank}.safetensors")
    (out / f"model{rank}.json").write_text(json.dumps({"t_f": model.t_f, "tf_curve": model.tf_curve}))
    leave_distributed()
