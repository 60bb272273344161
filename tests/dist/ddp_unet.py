"""Run under torchrun: train a tiny U-Net with DDP, save each rank's final weights.

    torchrun --standalone --nproc-per-node 2 ddp_unet.py DATA OUT_DIR STEPS BATCH_PER_RANK
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from inrseg.data.layouts import open_dataset
from inrseg.engine import init_distributed, leave_distributed, world
from inrseg.methods.unet import UNetConfig, UNetSegmenter

torch.set_num_threads(1)
data, out, steps, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
init_distributed(torch.device("cpu"))
rank, size = world()
ds = open_dataset(data)
cfg = UNetConfig(channels=(4, 8, 16), num_res_units=1, batch_size=batch, steps=steps, val_every=1000, lr=1e-2,
                 warmup=1)
model = UNetSegmenter(ds.label_names, 2, 1, cfg, device="cpu")
model.fit(ds.train, None, log_path=out / "metrics.jsonl")
save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
leave_distributed()
