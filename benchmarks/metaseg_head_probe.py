"""Probe of MetaSeg's phase-2 head on a trained model: what the head reads and how it trains.

A saved MetaSeg model (``metaseg_experiments.py --save``) is fitted, as at test time, to
training images (4,096 random pixels each) and to the validation images (every pixel) for T
steps. Heads are then trained on the training features and scored (mean foreground Dice) on
the validation pixels every 250 steps; the best score and its step are reported. Variants of
the head's input:

* ``plain``: the point's own features (the paper's head);
* ``coords``: + the point's coordinates;
* ``ctxK``: + the features at +-K pixels along each axis (5 points in 2D);
* ``ctxK+coords``: both.

Schedules: from the meta-learned head phi* (zero weights on the extra inputs) at Adam lr 1e-4
for 300 steps (the paper's phase 2) and at lr 1e-3 for 1,500 steps; optionally (``--fresh``)
from a fresh random head at lr 1e-3 for 1,500 steps. Batches of 8,192 feature rows, focal loss.

    python benchmarks/metaseg_head_probe.py MODEL --downsample 1 --t 100 --variants plain,ctx2,ctx4,ctx8,ctx4+coords

Writes ``benchmarks/results/<date>-metaseg-head-probe[-tag].md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import SHARED_DATA, markdown_table, write_results  # noqa: E402
from metaseg_experiments import downsample_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a MetaSeg checkpoint trained on --data")
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "brain2d-seg4")
    ap.add_argument("--downsample", type=int, default=1, help="the resolution the model was trained at")
    ap.add_argument("--t", default="100", help="test-time steps, comma-separated")
    ap.add_argument("--variants", default="plain,ctx2,ctx4,ctx8,ctx4+coords")
    ap.add_argument("--train-images", type=int, default=24)
    ap.add_argument("--fresh", action="store_true", help="also train a fresh head (lr 1e-3, 1,500 steps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()

    from inrseg.data.layouts import open_dataset, split_by_subject
    from inrseg.methods.metaseg import MetaSeg, focal_loss
    from inrseg.metrics import case_metrics
    from inrseg.nn.siren import head_forward, siren_features

    torch.set_num_threads(args.threads)
    t_list = [int(x) for x in args.t.split(",")]
    variants = {}
    for v in args.variants.split(","):
        base, _, extra = v.partition("+")
        variants[v] = (0 if base in ("plain", "coords") else int(base[3:]), base == "coords" or extra == "coords")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data if args.downsample == 1 else downsample_dataset(args.data, Path(tmp) / "ds", args.downsample)
        ds = open_dataset(data)
        train, val = split_by_subject(ds.train, 0.2, seed=0)
        model = MetaSeg.load(args.model)
        C = len(model.label_names)
        gen = torch.Generator().manual_seed(0)

        def offsets(im, d):
            H, W = im.shape
            g = im.coords.reshape(H, W, 2)
            sy, sx = float(g[1, 0, 0] - g[0, 0, 0]), float(g[0, 1, 1] - g[0, 0, 1])
            return [(0.0, 0.0)] + [(a * d * sy, b * d * sx) for a, b in ((1, 0), (-1, 0), (0, 1), (0, -1))]

        def inputs_at(theta, q, offs, with_coords):
            parts = [siren_features(theta, q + torch.tensor(o).to(q), model.config.w0) for o in offs]
            if with_coords:
                parts.append(q)
            return torch.cat(parts, -1)

        def collect(cases, n_points):
            out = {t: {v: [] for v in variants} for t in t_list}
            labels = []
            for c in cases:
                im = model._prepare(*c.load())
                N = im.coords.shape[0]
                idx = torch.randperm(N, generator=gen)[:n_points] if n_points else torch.arange(N)
                q = im.coords[idx]
                labels.append(im.labels[idx])
                for t, theta in model.fit_theta([im], max(t_list), t_list):
                    th = {k: v[0] for k, v in theta.items()}
                    for v, (d, with_coords) in variants.items():
                        out[t][v].append(inputs_at(th, q, offsets(im, d) if d else [(0.0, 0.0)], with_coords))
            return out, labels

        t0 = time.perf_counter()
        tr, tr_labels = collect(train[:args.train_images], 4096)
        va, va_labels = collect(val, None)
        feature_s = time.perf_counter() - t0

    def dice_of(head, feats, labels):
        scores = []
        with torch.no_grad():
            for f, lab in zip(feats, labels):
                p = head_forward(head, f).argmax(-1)
                scores.append(case_metrics(p[None].numpy(), lab[None].numpy(), C, distances=False).mean_foreground_dice)
        return float(np.nanmean(scores))

    def train_head(feats, labels, vfeats, vlabels, steps, lr, init=None):
        X, Y = torch.cat(feats), torch.cat(labels)
        din, h = X.shape[1], model.config.hidden
        g = torch.Generator().manual_seed(1)
        if init is not None:  # phi*, zero weights on the extra inputs
            w0 = torch.zeros(h, din)
            w0[:, :h] = init["g.0.weight"]
            head = {"g.0.weight": w0, "g.0.bias": init["g.0.bias"].clone(),
                    "g.2.weight": init["g.2.weight"].clone(), "g.2.bias": init["g.2.bias"].clone()}
        else:
            head = {"g.0.weight": (torch.rand(h, din, generator=g) * 2 - 1) / math.sqrt(din), "g.0.bias": torch.zeros(h),
                    "g.2.weight": (torch.rand(C, h, generator=g) * 2 - 1) / math.sqrt(h), "g.2.bias": torch.zeros(C)}
        head = {k: v.requires_grad_(True) for k, v in head.items()}
        opt = torch.optim.Adam(head.values(), lr=lr)
        best = (dice_of(head, vfeats, vlabels), 0)
        for i in range(1, steps + 1):
            idx = torch.randint(X.shape[0], (8192,), generator=g)
            loss = focal_loss(head_forward(head, X[idx]), Y[idx], model.config.focal_gamma)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i % 250 == 0:
                d = dice_of(head, vfeats, vlabels)
                if d > best[0]:
                    best = (d, i)
        return best

    rows = []
    for t in t_list:
        for v in variants:
            row = {"T": t, "head input": v}
            for name, steps, lr, init in (("phi*, lr 1e-4 x 300", 300, 1e-4, model.meta_head),
                                          ("phi*, lr 1e-3 x 1500", 1500, 1e-3, model.meta_head)) + (
                                          (("fresh, lr 1e-3 x 1500", 1500, 1e-3, None),) if args.fresh else ()):
                d, at = train_head(tr[t][v], tr_labels, va[t][v], va_labels, steps, lr, init)
                row[f"{name}: val Dice"], row[f"{name}: at step"] = d, at
            rows.append(row)
            print(row, flush=True)
    notes = (f"Model `{args.model.name}`; data `{args.data.name}`"
             f"{'' if args.downsample == 1 else f' down-sampled {args.downsample}x'}; heads trained on "
             f"{min(args.train_images, len(train))} training images (4,096 pixels each), scored on all pixels of "
             f"{len(val)} validation images; {args.threads} torch threads; features {feature_s:.0f} s. "
             "Validation only: nothing here touches the test subjects.")
    tag = "metaseg-head-probe" + (f"-{args.tag}" if args.tag else "")
    print(write_results(tag, {"Validation Dice of the phase-2 head": markdown_table(rows)}, notes).read_text())


if __name__ == "__main__":
    main()
