"""Run under torchrun: ``inrseg segment`` with every label-map write recorded per rank.

    torchrun --standalone --nproc-per-node 2 segment_cli.py RECORD_DIR -- SEGMENT ARGS...
"""

import sys
from pathlib import Path

import inrseg.cli.segment as segment_command
from inrseg.cli import main
from inrseg.engine import local_rank

record = Path(sys.argv[1]) / f"writes-rank{local_rank()}.txt"
args = sys.argv[sys.argv.index("--") + 1:]
original = segment_command.save_labels


def recording_save_labels(data, path, *a, **kw):
    with open(record, "a") as f:
        f.write(f"{Path(path).name}\n")
    return original(data, path, *a, **kw)


segment_command.save_labels = recording_save_labels
sys.exit(main(["segment", *args]))
