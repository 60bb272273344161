"""GPU check: every method trains a few steps on the device (bf16 where the method allows it),
segments, and the test-time work is timed against the CPU.

    python benchmarks/perf/gpu_check.py --device cuda            # what gpu_check.sh runs
    python benchmarks/perf/gpu_check.py --device cpu --quick     # a dry run of the script itself

Prints one markdown report (and writes it to ``--out``): per (method, data) the training steps,
seconds, precision and test Dice on phantoms (a few steps: Dice is not the point, running is),
then the medians of test-time fitting (MetaSeg, NISF) and of a U-Net forward pass on the device
against the CPU, as ratios. Phantoms only: nothing is read from outside the repository.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from inrseg.cli.train import train_model
from inrseg.core.progress import set_quiet
from inrseg.data.layouts import open_dataset
from inrseg.data.phantoms.datasets import write_phantom_dataset
from inrseg.engine import resolve_device, use_bf16
from inrseg.eval.provenance import machine_line, write_result_file
from inrseg.methods.registry import ENTRIES, load_segmenter
from inrseg.metrics import score_case

#: a few steps of each method (the small settings of the check, not of a benchmark)
SETTINGS = {"unet": ["val_every=10"], "segresnet": ["val_every=10"], "morse": ["val_every=10"],
            "metaseg": ["val_every=10", "phase2_steps=20", "phase2_max_cases=2", "tf_candidates=[10, 20]"],
            "nisf": ["save_every=10", "infer_max_steps=20"]}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up, synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a check of the script on any machine")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = ap.parse_args()
    set_quiet(True)
    dev = resolve_device(args.device)
    steps = 4 if args.quick else 30
    shape2d, shape3d = ((32, 40), (24, 24, 24)) if args.quick else ((96, 112), (48, 56, 64))
    rows, timing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = {2: Path(tmp) / "brain2d", 3: Path(tmp) / "brain3d"}
        write_phantom_dataset("brain2d", data[2], n_train=6, n_test=2, seed=0, shape=shape2d)
        write_phantom_dataset("brain3d", data[3], n_train=4, n_test=1, seed=0, shape=shape3d)
        models = {}
        for name, e in ENTRIES.items():
            for nd in (2, 3):
                if nd not in e.cls.spatial_ndims:
                    continue
                out = Path(tmp) / f"{name}-{nd}d.safetensors"
                t0 = time.perf_counter()
                model = train_model(name, data[nd], out, val_fraction=0.34, device=str(dev),
                                    sets=SETTINGS[name], steps=steps)
                train_s = time.perf_counter() - t0
                seg = load_segmenter(out, device=dev)
                ds = open_dataset(data[nd])
                dice = []
                for case in ds.test:
                    image, labels = case.load()
                    pred = seg.predict(image)
                    dice.append(score_case(pred.data, labels.data, ds.num_classes, labels.spacing, False)
                                .mean_foreground_dice)
                rows.append([name, f"{nd}D", steps, f"{train_s:.1f}",
                             "bf16" if use_bf16(dev, "auto", e.cls.bf16_safe) else "fp32",
                             f"{statistics.fmean(dice):.3f}", f"{model.num_params / 1e6:.3f}M"])
                models[(name, nd)] = out
                print(f"{name} {nd}D: trained {steps} steps in {train_s:.1f} s", flush=True)
        cpu = torch.device("cpu")
        image2d = open_dataset(data[2]).test[0].load_image()
        for name in ("metaseg", "nisf"):
            on = {d: load_segmenter(models[(name, 2)], device=d) for d in (dev, cpu)}
            t = {d: timed(lambda m=on[d]: m.predict(image2d), d, 3) for d in (dev, cpu)}
            timing.append([f"{name} test-time fit + labels, one 2D image", f"{t[dev]:.3f}", f"{t[cpu]:.3f}",
                           f"{t[cpu] / t[dev]:.1f}x"])
        unet = {d: load_segmenter(models[("unet", 2)], device=d) for d in (dev, cpu)}
        batch = torch.randn(8, 1, 160, 192)
        t = {}
        for d in (dev, cpu):
            net, x = unet[d].net.eval(), batch.to(d)
            with torch.no_grad():
                t[d] = timed(lambda n=net, x=x: n(x), d, 5)
        timing.append(["U-Net forward, batch 8 of 160 x 192", f"{t[dev]:.4f}", f"{t[cpu]:.4f}", f"{t[cpu] / t[dev]:.1f}x"])

    def table(head, body):
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(map(str, r)) + " |" for r in body])

    sections = {"Training and segmentation on the device": table(
                    ["method", "data", "steps", "train + choose s", "precision", "test Dice (phantom)", "params"], rows),
                "Test-time work: device against CPU (median seconds)": table(
                    ["what", str(dev), f"cpu ({torch.get_num_threads()} threads)", "speed-up"], timing)}
    notes = (f"Device {dev} on {machine_line(dev)}; torch {torch.__version__}. Phantoms: brain2d {shape2d}, "
             f"brain3d {shape3d}; every method {steps} steps with the check's small settings.")
    path = write_result_file(args.out, "gpu-check" + ("-quick" if args.quick else ""), notes, sections)
    print(path.read_text())
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
