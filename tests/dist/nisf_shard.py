"""Run under torchrun: NISF's prior with the training cases (their latents) sharded over the
ranks. Trains STEPS steps in one go, then STEPS / 2 steps into a training state and resumes
it to STEPS. Each rank saves its latent table as it holds it (spied on the gather) and its
network; rank 0 saves both models. The spy replaces
inrseg.methods.nisf.training.gather_rows, through which every gather of the table goes.

    torchrun --standalone --nproc-per-node 2 nisf_shard.py DATA OUT_DIR STEPS [AUGMENT]

AUGMENT (default 0): augmented copies per training case (NISFConfig.augment).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import inrseg.methods.nisf.training as training
from inrseg.data.layouts import open_dataset
from inrseg.engine import init_distributed, leave_distributed, world
from inrseg.methods.nisf import NISF, NISFConfig

torch.set_num_threads(1)
data, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
augment = int(sys.argv[4]) if len(sys.argv) > 4 else 0
init_distributed(torch.device("cpu"))
rank, size = world()
ds = open_dataset(data)

held: list[tuple[torch.Tensor, torch.Tensor]] = []   # (table as this rank holds it, own rows)
gather = training.gather_rows


def spy(table: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    held.append((table.detach().clone(), own.clone()))
    return gather(table, own)


training.gather_rows = spy


def model(n_steps: int) -> NISF:
    cfg = NISFConfig(width=32, depth=3, steps=n_steps, lr=3e-3, subjects_per_step=2,
                     points_per_step=256, save_every=steps // 2, infer_steps=5, augment=augment)
    return NISF(ds.label_names, 2, 1, cfg, device="cpu")


full = model(steps)
full.fit(ds.train, None, log_path=out / "metrics.jsonl")
table, own = held[-1]  # the last gather of fit: the trained latents
save_file({"latents": table, "own": own.to(torch.uint8),
           **{f"net.{k}": v.contiguous() for k, v in full.net.state_dict().items()}},
          str(out / f"rank{rank}.safetensors"))
model(steps // 2).fit(ds.train, None, out / "state")
resumed = model(steps)
resumed.fit(ds.train, None, out / "state")
if rank == 0:
    full.save(out / "full.safetensors")
    resumed.save(out / "resumed.safetensors")
leave_distributed()
