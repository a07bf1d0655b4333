"""Run by tests/test_distributed.py under torchrun: prune each given folder with --distributed fsdp.

argv: OUT_DIR CALIB_FILE MODEL_DIR [MODEL_DIR ...]. Every rank saves what prune returned, and the
magnitude scores of the same shards, to ``OUT_DIR/<model name>.rank<R>.pt`` so the test can check
them and that all ranks agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nirvana.distributed import fsdp_scores, shard_for_scoring
from nirvana.models import load_model
from nirvana.pruning import PruneSettings, prune

# The settings the test repeats on one process.
SETTINGS = dict(sparsity=0.3, num_samples=5, seq_len=12, micro_batch_size=2, round_to=1, gamma=2.0)


def main(argv: list[str]) -> None:
    out, calib, models = Path(argv[0]), argv[1], argv[2:]
    torch.set_num_threads(1)
    # Initialised here so that the process group outlives each prune and serves several models.
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for folder in models:
        name = Path(folder).name
        settings = PruneSettings(
            model=folder, calib=calib, device="cpu", distributed="fsdp", out=str(out / name), **SETTINGS
        )
        result = prune(settings, progress=False)
        saved = {"attention": result.scores.attention, "mlp": result.scores.mlp, "plan": result.plan.to_dict()}
        # The weight-only baseline through the same shards, with no backward pass.
        sharded = shard_for_scoring(load_model(folder)[0])
        magnitude = fsdp_scores(sharded, None, saliency="magnitude", progress=False)
        saved.update(magnitude_attention=magnitude.attention, magnitude_mlp=magnitude.mlp)
        torch.save(saved, out / f"{name}.rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
