"""NIRVANA structured pruning as an llm-compressor modifier (llmcompressor 0.14, ``make test-integrations``).

:class:`NirvanaPruningModifier` goes first in an llm-compressor recipe. In ``on_initialize``, where
gradients are still enabled and ``state.data.calib`` is the calibration loader, it scores the dense
model with :func:`nirvana.saliency.compute_scores` (max-logit Taylor saliency, the kernels), makes a
plan with :func:`nirvana.allocation.allocate` and removes the KV groups (with their query heads) and
MLP channels physically with :func:`nirvana.compaction.compact_model`. Modifiers initialize in recipe
order, so those that follow (``GPTQModifier``, ...) see and calibrate the smaller model. In
``on_finalize`` the config is derived once more from the final widths
(:func:`nirvana.checkpoint.apply_config`), and ``model.save_pretrained`` is wrapped so that the saved
config.json says them too (llm-compressor's own save rewrites it from the dense model's file).

With ``allocation="uniform"`` every layer keeps the same widths, so the config is a stock one (fewer
``num_attention_heads`` and ``num_key_value_heads``, a smaller ``intermediate_size``, an explicit
``head_dim``) and stock ``from_pretrained`` loads the saved folder, compressed-tensors quantized or not
(tested with GPTQ W4A16; vLLM is not tested here). ``allocation="global"`` gives each layer its own
widths, which a stock config cannot say: the saved config carries nirvana's per-layer block and
``modeling_nirvana.py``, loaded with ``trust_remote_code=True`` or :func:`nirvana.checkpoint.load_pruned`
(tested unquantized).

Calibration windows: every batch's tokens where ``attention_mask`` is 1 (padding dropped), in loader
order. With ``seq_len=None`` each sample is one window, cut to the shortest sample's length (nirvana
scores windows of one length); with ``seq_len=T`` the samples' tokens are joined and cut into as many
windows of ``T`` tokens as fit (the remainder is dropped).
"""

from __future__ import annotations

import functools
import math
import numbers
import types
from pathlib import Path

import torch
from compressed_tensors.distributed import is_source_process
from llmcompressor.core import State
from llmcompressor.modifiers import Modifier
from pydantic import PrivateAttr
from torch import nn

from ..adapters import architecture_names, get_adapter
from ..allocation import ALLOCATIONS, allocate, prune_fractions
from ..checkpoint import apply_config, base_architecture, model_config_updates, rewrite_config
from ..compaction import check_dense, compact_model
from ..objective import OBJECTIVES
from ..plan import PruningPlan
from ..saliency import compute_scores
from ..scores import Scores

__all__ = ["NirvanaPruningModifier", "calibration_windows"]


def _check_arguments(values: dict) -> None:
    """A one-line ValueError naming the first bad argument; checked before pydantic sees them."""
    sparsity = values.get("sparsity")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity: must be a number in (0, 1), got {sparsity!r}")
    gamma = values.get("gamma", 3.0)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 < gamma < math.inf:
        raise ValueError(f"gamma: must be a finite number > 0, got {gamma!r}")
    for name, choices, default in (
        ("allocation", ALLOCATIONS, "uniform"),
        ("saliency", ("taylor", "adam"), "taylor"),
        ("objective", OBJECTIVES, "maxlogit"),
    ):
        value = values.get(name, default)
        if value not in choices:
            raise ValueError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
    for name, default in (("round_to", 8), ("micro_batch_size", 8), ("seq_len", None)):
        value = values.get(name, default)
        if value is None and name == "seq_len":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def calibration_windows(loader, seq_len: int | None = None) -> torch.Tensor:
    """Integer ``[N, T]`` token windows (int64, CPU) from an llm-compressor calibration loader.

    Each batch is a mapping with ``input_ids`` ``[B, T_b]`` and optionally ``attention_mask``; only the
    tokens whose mask is 1 count. ``seq_len=None``: one window per sample, all cut to the shortest
    sample's length. ``seq_len=T``: the samples' tokens joined in loader order and cut into
    ``len // T`` windows of ``T``.

    Raises:
        ValueError: the loader is None or yields no tokens, a batch has no ``input_ids``, or fewer
            than ``seq_len`` tokens in all.
    """
    if loader is None:
        raise ValueError("calib: NirvanaPruningModifier needs calibration data, got none (pass dataset= to oneshot)")
    samples: list[torch.Tensor] = []
    for i, batch in enumerate(loader):
        if "input_ids" not in batch:
            raise ValueError(f"calib: batch {i} has no input_ids (keys: {sorted(batch)})")
        ids = torch.as_tensor(batch["input_ids"])
        ids = ids.reshape(-1, ids.shape[-1])
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        samples += [row[m.bool()].to("cpu", torch.int64) for row, m in zip(ids, mask)]
    samples = [s for s in samples if s.numel()]
    if not samples:
        raise ValueError("calib: the calibration loader yielded no tokens")
    if seq_len is None:
        length = min(s.numel() for s in samples)
        return torch.stack([s[:length] for s in samples])
    stream = torch.cat(samples)
    if stream.numel() < seq_len:
        raise ValueError(f"seq_len: {seq_len} is more than the {stream.numel()} calibration tokens there are")
    n = stream.numel() // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


class NirvanaPruningModifier(Modifier):
    """Remove NIRVANA's lowest-scored KV groups and MLP channels, physically, before what follows.

    Args:
        sparsity: share of the prunable (attention + MLP linear) parameters removed, in (0, 1).
        gamma: MLP fraction pruned / attention fraction pruned (nirvana's default 3).
        allocation: ``"uniform"`` (same widths in every layer: a stock config) or ``"global"``
            (ranked across layers: a config with nirvana's per-layer block).
        round_to: MLP widths are multiples of it (or the dense width).
        saliency: ``"taylor"`` (NIRVANA) or ``"adam"`` (micro-batch second moments).
        objective: ``"maxlogit"`` (NIRVANA) or ``"ce"``.
        micro_batch_size: calibration windows per forward/backward pass.
        seq_len: window length; None takes each calibration sample as one window (see the module doc).

    After ``on_initialize``, :attr:`scores` holds nirvana's :class:`~nirvana.saliency.Scores` of the
    dense model and :attr:`plan` the :class:`~nirvana.plan.PruningPlan` applied (dense indices).
    """

    requires_calibration_data: bool = True

    sparsity: float
    gamma: float = 3.0
    allocation: str = "uniform"
    round_to: int = 8
    saliency: str = "taylor"
    objective: str = "maxlogit"
    micro_batch_size: int = 8
    seq_len: int | None = None

    _scores: Scores | None = PrivateAttr(default=None)
    _plan: PruningPlan | None = PrivateAttr(default=None)

    def __init__(self, **values):
        # pydantic would wrap a validator's ValueError in a multi-line ValidationError.
        _check_arguments(values)
        super().__init__(**values)

    @property
    def scores(self) -> Scores | None:
        """nirvana's scores of the dense model (float32 ``[L, H_kv]`` and ``[L, I]``), once initialized."""
        return self._scores

    @property
    def plan(self) -> PruningPlan | None:
        """The plan this modifier applied, once initialized."""
        return self._plan

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        adapter = get_adapter(model)
        geometry = check_dense(model, adapter, "NirvanaPruningModifier prunes a dense model")
        # Fractions above 1 (too much sparsity for this gamma) are refused before any backward pass.
        prune_fractions(geometry, self.sparsity, self.gamma)
        windows = calibration_windows(state.data.calib, self.seq_len)
        # oneshot initializes with grad mode on; a caller that initializes under no_grad gets it on too.
        with torch.enable_grad():
            self._scores = compute_scores(
                model,
                windows,
                objective=self.objective,
                saliency=self.saliency,
                micro_batch_size=self.micro_batch_size,
                progress=False,
            )
        self._plan = allocate(
            self._scores.attention,
            self._scores.mlp,
            geometry,
            sparsity=self.sparsity,
            gamma=self.gamma,
            allocation=self.allocation,
            round_to=self.round_to,
            architecture=architecture_names(model)[0],
        )
        compact_model(model, self._plan)
        return True

    def on_finalize(self, state: State, **kwargs) -> bool:
        model = state.model
        # The config is derived once more from the widths there are now, whatever ran in between.
        apply_config(model)
        sizes, block = model_config_updates(model)
        _rewrite_config_on_save(model, sizes, block, base_architecture(model))
        return True


def _rewrite_config_on_save(model: nn.Module, sizes: dict, block: dict | None, base: str) -> None:
    """Make ``model.save_pretrained`` write the pruned sizes into config.json after llm-compressor's own save.

    llm-compressor's save (installed by ``oneshot`` before any modifier runs) rewrites config.json from the
    original checkpoint's file, patching only the fields its own modifiers change (dtype, tied
    embeddings, expert counts), which would bring back the dense head counts and intermediate size.
    This wraps it and puts them right with :func:`nirvana.checkpoint.rewrite_config`, as ``nirvana
    prune`` does for its own checkpoints: the stock sizes for a uniform plan, else nirvana's block and
    remote code. Bound as a method so that a later llm-compressor wrap (it takes ``__func__``) still works.
    """
    inner = model.save_pretrained

    @functools.wraps(inner)
    def save_pretrained(self, save_directory, *args, **kwargs):
        result = inner(save_directory, *args, **kwargs)
        if is_source_process():
            rewrite_config(Path(save_directory), sizes, block, base)
        return result

    model.save_pretrained = types.MethodType(save_pretrained, model)
