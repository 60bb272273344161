"""Run under torchrun: train a tiny MORSE (variant "iar") with DDP, save each rank's final
weights and rend_steps.

    torchrun --standalone --nproc-per-node 2 ddp_morse.py DATA OUT_DIR STEPS BATCH_PER_RANK
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from inrseg.data.layouts import open_dataset
from inrseg.engine import init_distributed, leave_distributed, world
from inrseg.methods.morse import MORSE, morse_config

torch.set_num_threads(1)
data, out, steps, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
init_distributed(torch.device("cpu"))
rank, size = world()
ds = open_dataset(data)
cfg = morse_config("unet", "iar", 2, backbone_overrides={"channels": (4, 8, 16), "num_res_units": 1},
                   point_width=16, fourier_frequencies=8, train_points=64, test_points=64,
                   batch_size=batch, steps=steps, val_every=1000, lr=1e-2)
model = MORSE(ds.label_names, 2, 1, cfg, device="cpu")
model.fit(ds.train, None, log_path=out / "metrics.jsonl")
save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
(out / f"rank{rank}.json").write_text(json.dumps({"rend_steps": model.rend_steps}))
leave_distributed()
