"""Run by tests/test_distributed.py under torchrun: prune one folder with --distributed fsdp, every method.

argv: OUT_DIR CALIB_FILE MODEL_DIR [MODEL_DIR ...]. Every rank saves, to ``OUT_DIR/<model
name>.<case>.rank<R>.pt``, what prune returned for each of :data:`CASES` (the default nirvana run also
writes its checkpoint to ``OUT_DIR/<model name>``), and to ``<model name>.shards.rank<R>.pt`` the
magnitude scores of the same shards and Adam scores from an optimizer built over the shards, so the
test can check them against one process and that all ranks agree. One launch for all of them: each
costs seconds of imports on a busy runner.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from nirvana import rank_load
from nirvana.adapters import get_adapter
from nirvana.calibration import calibration_windows
from nirvana.distributed import fsdp_scores, shard_for_scoring
from nirvana.models import load_model
from nirvana.pruning import PruneSettings, prune
from nirvana.sources.fsdp import reduce_rows

# The settings the test repeats on one process.
# One draw unless a case asks for more (flap-draws): each case compares with one process's single scoring pass.
SETTINGS = dict(sparsity=0.3, num_samples=5, seq_len=12, micro_batch_size=2, round_to=1, gamma=2.0, draws=1)
# Each case's settings on top of SETTINGS; "nirvana" also writes its checkpoint.
CASES = {
    "nirvana": {},
    "magnitude": dict(method="magnitude"),
    "random": dict(method="random", seed=3),
    "wanda-sp": dict(method="wanda-sp"),
    "flap": dict(method="flap"),
    "taylor": dict(method="taylor"),  # per-window gradients, from hooks on the sharded layers
    "adam": dict(saliency="adam"),  # micro-batch Adam: one process with micro_batch_size * world_size
    "flap-select": dict(method="flap", select_calib=2, gamma="auto", heldout_samples=3),
    "wanda-sp-bias": dict(method="wanda-sp", compensate="bias"),  # FLAP's sharded compensation for another method
    # Two candidates of two draws each: the mean scores and the pooled statistics, on rank 0 and in the selection.
    "flap-draws": dict(method="flap", select_calib=2, draws=2, heldout_samples=3),
    # The allocation rules reach rank 0's allocation and every rank's KL selection.
    "rules": dict(protect_layers=1, min_kv_groups=2, normalize="median", select_calib=2, heldout_samples=3),
}
# A folder of this name (a tied MHA model split over 3 safetensors shards) gets the rank-local loading
# cases instead: each prune writes its checkpoint, and each rank records what its loader read and the
# shapes of every tensor it created while loading.
STREAMED = "llama-3shards"
# "stream-self" samples its calibration windows from the sharded model (--calib self).
STREAMED_CASES = {"stream": {}, "stream-flap": dict(method="flap"), "stream-self": dict(calib="self")}
# Adam's state for the optimizer case: lr 0 leaves the weights alone, one step sets exp_avg_sq.
ADAM = dict(lr=0.0, betas=(0.9, 0.99), eps=1e-6)


def fake_gradients(params) -> None:
    """A gradient for every parameter that only depends on its values (so shards and one process agree)."""
    for p in params:
        p.grad = p.detach().square() + 0.5


def compensated_biases(model) -> dict[str, torch.Tensor]:
    """Every layer's o_proj and down_proj bias (FLAP's compensation), or {} where there are none."""
    out = {}
    for i, lm in enumerate(get_adapter(model).layers(model)):
        for name, linear in (("o", lm.o), ("down", lm.down)):
            if linear.bias is not None:
                out[f"{i}.{name}"] = linear.bias.detach().clone()
    return out


def streamed_biases(biases: dict | None) -> dict[str, torch.Tensor]:
    """:func:`compensated_biases`'s entries from a distributed run's float64 biases by parameter name."""
    out = {}
    for name, value in (biases or {}).items():
        layer = name.split(".layers.")[1].split(".")[0]
        out[f"{layer}.{'o' if 'o_proj' in name else 'down'}"] = value.to(torch.float32)
    return out


def main(argv: list[str]) -> None:
    out, calib, models = Path(argv[0]), argv[1], argv[2:]
    torch.set_num_threads(1)
    # Initialised here so that the process group outlives each prune and serves every case.
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for folder in models:
        name = Path(folder).name
        if name == STREAMED:
            streamed_cases(folder, calib, out, rank)
            rank_zero_fails(folder, calib, out, rank)
            continue
        for case, overrides in CASES.items():
            target = dict(out=str(out / name)) if case == "nirvana" else {}
            settings = PruneSettings(
                model=folder, calib=calib, device="cpu", distributed="fsdp", **{**SETTINGS, **overrides, **target}
            )
            result = prune(settings, progress=False)
            saved = {
                "attention": result.scores.attention,
                "mlp": result.scores.mlp,
                "meta": result.scores.meta,
                "plan": result.plan.to_dict(),
            }
            if rank == 0:
                saved.update(selection=result.report["selection"], biases=streamed_biases(result.biases))
            torch.save(saved, out / f"{name}.{case}.rank{rank}.pt")
        torch.save(shard_scores(folder, calib), out / f"{name}.shards.rank{rank}.pt")
    torch.save(reduced_rows(rank), out / f"reduce_rows.rank{rank}.pt")
    dist.destroy_process_group()


def reduced_rows(rank: int) -> dict:
    """Each rank's own gradient and its rows of the sum, for row counts the world size does and does not divide."""
    cases = {}
    for rows in (4, 5, 1):
        grad = torch.randn(rows, 3, generator=torch.Generator().manual_seed(rows * 10 + rank)).to(torch.bfloat16)
        chunk = -(-rows // dist.get_world_size())
        start = min(rank * chunk, rows)
        cases[rows] = (grad, start, reduce_rows(grad, start, min(chunk, rows - start)))
    return cases


class CreatedShapes(TorchDispatchMode):
    """Every shape of a plain tensor an op produced on a real (not meta) device while active.

    A DTensor has the global shape but holds only its local tensor, which is recorded by itself.
    """

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.device.type != "meta":
                self.shapes.add(tuple(t.shape))
        return out


def streamed_cases(folder: str, calib: str, out: Path, rank: int) -> None:
    """Prune the 3-shard folder under each of STREAMED_CASES to ``out/<case>``, recording each rank's loading."""
    original = rank_load.load_sharded
    for case, overrides in STREAMED_CASES.items():
        seen = {}

        def recorded(*args, seen=seen, **kwargs):
            with CreatedShapes() as mode:
                root, record = original(*args, **kwargs)
            seen.update(shapes=sorted(mode.shapes), reads=record.to_dict())
            return root, record

        rank_load.load_sharded = recorded
        try:
            settings = PruneSettings(
                model=folder, device="cpu", distributed="fsdp", out=str(out / case),
                **{**SETTINGS, "calib": calib, **overrides},
            )  # fmt: skip
            result = prune(settings, progress=False)
        finally:
            rank_load.load_sharded = original
        saved = {"plan": result.plan.to_dict(), "report": result.report, **seen}
        torch.save(saved, out / f"{case}.rank{rank}.pt")


def rank_zero_fails(folder: str, calib: str, out: Path, rank: int) -> None:
    """Rank 0's write fails: every rank records what it raised, and no rank waits for the timeout."""
    from nirvana import apply

    original = apply.write_stream

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    apply.write_stream = broken
    try:
        settings = PruneSettings(
            model=folder, calib=calib, device="cpu", distributed="fsdp", out=str(out / "failed"), **SETTINGS
        )
        prune(settings, progress=False)
        raised = None
    except Exception as err:  # what each rank saw is the record
        raised = f"{type(err).__name__}: {err}"
    finally:
        apply.write_stream = original
    torch.save({"raised": raised}, out / f"failed.rank{rank}.pt")


def shard_scores(folder: str, calib: str) -> dict:
    """Magnitude scores, and Adam scores from an optimizer's state, of one sharded model."""
    model, tokenizer = load_model(folder)
    sharded = shard_for_scoring(model)
    # The weight-only baseline through the same shards, with no backward pass.
    magnitude = fsdp_scores(sharded, None, saliency="magnitude", progress=False)
    # An optimizer over the shards: its exp_avg_sq are DTensors sharded like the weights.
    optimizer = torch.optim.Adam(sharded.parameters(), **ADAM)
    fake_gradients(sharded.parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    windows = calibration_windows(calib, tokenizer, num_samples=SETTINGS["num_samples"], seq_len=SETTINGS["seq_len"])
    mbs = SETTINGS["micro_batch_size"]
    adam = fsdp_scores(sharded, windows, saliency="adam", optimizer=optimizer, micro_batch_size=mbs, progress=False)
    saved = {"magnitude_attention": magnitude.attention, "magnitude_mlp": magnitude.mlp}
    return saved | {"adam_attention": adam.attention, "adam_mlp": adam.mlp, "adam_meta": adam.meta}


if __name__ == "__main__":
    main(sys.argv[1:])
