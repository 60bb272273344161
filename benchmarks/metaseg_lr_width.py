"""How far one SIREN fit gets per width and Adam learning rate (MetaSeg's test-time fit).

Fits a randomly initialised SIREN (w0 = 30) to one brain2d-seg24 test slice with Adam on
4,096 random pixels per step, and prints the PSNR (dB) after 10 / 25 / 50 / 100 steps for
the widths of MetaSeg's presets (128 x 6, 256 x 6, 512 x 5) and lr 1e-4 ... 1e-3. About a
minute on one core:

    python benchmarks/metaseg_lr_width.py [--dataset brain2d-seg24] [--threads 1]
"""

from __future__ import annotations

import argparse
import math

import torch

from harness import SHARED_DATA, markdown_table
from inrseg.data.layouts import open_dataset
from inrseg.methods.metaseg import MetaSeg, MetaSegConfig
from inrseg.nn.siren import siren_forward

STEPS = (10, 25, 50, 100)
LRS = (1e-4, 2.5e-4, 5e-4, 1e-3)
SIZES = ((128, 6), (256, 6), (512, 5))


def psnr_curve(ds, hidden: int, layers: int, lr: float) -> list[float]:
    """PSNR (dB, intensities in [0, 1]) of the first test image after each of ``STEPS``."""
    image, labels = ds.test[0].load()
    model = MetaSeg(ds.label_names, ds.spatial_ndim, len(ds.channel_names),
                    MetaSegConfig(hidden=hidden, layers=layers, test_lr=lr, fit_points=4096))
    im = model._prepare(image, labels)
    out = []
    for _, theta in model.fit_theta([im], max(STEPS), STEPS, torch.Generator().manual_seed(0)):
        with torch.no_grad():
            pred = siren_forward(theta, im.coords[None], model.config.w0)[0][0]
        out.append(10 * math.log10(1.0 / float((pred - im.pixels).pow(2).mean())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="brain2d-seg24")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = open_dataset(SHARED_DATA / args.dataset)
    rows = []
    for hidden, layers in SIZES:
        row = {"width x layers": f"{hidden} x {layers}"}
        for lr in LRS:
            row[f"lr {lr:g}"] = "/".join(f"{v:.1f}" for v in psnr_curve(ds, hidden, layers, lr))
        rows.append(row)
        print(markdown_table([row]), flush=True)
    print(f"PSNR (dB) after {'/'.join(map(str, STEPS))} steps\n" + markdown_table(rows))


if __name__ == "__main__":
    main()
