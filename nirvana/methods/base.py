"""The one interface every scorer implements, so that ``prune()`` runs any of them the same way."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

from ..plan import PruningPlan
from ..saliency import compute_scores
from ..scores import Scores
from ..sources.activations import activation_statistics
from ..sources.weights import DENSE_WEIGHTS, WeightReductions
from .common import with_window_meta

# What a method reads, from the cheapest source to the dearest.
WEIGHTS_ONLY = "weights only"
ACTIVATIONS = "activations"
GRADIENTS = "gradients"
PER_WINDOW_GRADIENTS = "per-window gradients"
NEEDS = (WEIGHTS_ONLY, ACTIVATIONS, GRADIENTS, PER_WINDOW_GRADIENTS)


class Method(abc.ABC):
    """A named scorer: dense model (and calibration windows) in, :class:`Scores` out.

    Class attributes:
        name: the ``--method`` name.
        needs: one of :data:`NEEDS`, what it reads from the model and the windows.
        settings: the :class:`nirvana.pruning.PruneSettings` fields :meth:`scores` takes as keywords.
        uses_statistics: it scores from activation statistics (:meth:`statistics` gathers them).
        compensates: :meth:`compensate` changes the model beyond the plan's slices, from the statistics,
            so a plan alone does not reproduce its result (``nirvana apply`` refuses such plans).
        allocation: the allocation its paper prunes with (one of :data:`nirvana.allocation.ALLOCATIONS`),
            what ``nirvana prune`` uses unless ``--allocation`` says otherwise.
        misallocations: allocation -> why that allocation is known to be meaningless for these scores;
            asking for one is allowed, with a warning (:meth:`allocation_warning`).
        encoder_decoder_refusal: None if it scores encoder-decoders (T5) too, else why it does not.
        protect_layers: how many first layers ``nirvana prune`` keeps whole by default with global
            allocation (``--protect-layers`` overrides it); a baseline's is 0, as its paper prunes.
        seq_len: tokens per calibration window ``nirvana prune`` draws by default (``--seq-len`` overrides
            it); a baseline's is 128, the length it was measured with here.
        draws: calibration draws whose scores ``nirvana prune`` averages by default (``--draws``
            overrides it); a baseline's is 1, as its paper scores one set.
    """

    name: ClassVar[str]
    needs: ClassVar[str]
    settings: ClassVar[tuple[str, ...]] = ()
    uses_statistics: ClassVar[bool] = False
    compensates: ClassVar[bool] = False
    allocation: ClassVar[str] = "global"
    misallocations: ClassVar[dict[str, str]] = {}
    encoder_decoder_refusal: ClassVar[str | None] = None
    protect_layers: ClassVar[int] = 0
    seq_len: ClassVar[int] = 128
    draws: ClassVar[int] = 1

    def check_model(self, model: nn.Module) -> None:
        """A one-line ValueError if this method cannot score ``model`` (an encoder-decoder, for some)."""
        if self.encoder_decoder_refusal is not None and getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"method: {self.name!r} does not score encoder-decoders: {self.encoder_decoder_refusal}")

    def resolve_protect_layers(self, protect_layers: int | None, num_layers: int, allocation: str) -> int:
        """``protect_layers``, or when it is None this method's default, at most ``num_layers - 1``; the
        default is for the global ranking it was measured with, so a ``uniform`` allocation (every layer
        alike) gets 0."""
        if protect_layers is not None:
            return protect_layers
        return min(self.protect_layers, num_layers - 1) if allocation == "global" else 0

    def resolve_seq_len(self, seq_len: int | None) -> int:
        """``seq_len``, or this method's default when it is None."""
        return self.seq_len if seq_len is None else seq_len

    def resolve_draws(self, draws: int | None) -> int:
        """``draws``, or this method's default when it is None."""
        return self.draws if draws is None else draws

    def resolve_allocation(self, allocation: str | None) -> str:
        """``allocation``, or this method's own when it is None (unchecked: ``allocate`` checks the name)."""
        return self.allocation if allocation is None else allocation

    def allocation_warning(self, allocation: str) -> str | None:
        """One line saying why ``allocation`` is meaningless for this method's scores, or None when it is not."""
        why = self.misallocations.get(allocation)
        if why is None:
            return None
        return (
            f"allocation: {allocation!r} with method {self.name!r} is known to prune badly ({why}); "
            f"its own is {self.allocation!r}"
        )

    @property
    def data_free(self) -> bool:
        """Whether it scores without calibration windows."""
        return self.needs == WEIGHTS_ONLY

    def statistics(self, model: nn.Module, windows: torch.Tensor, *, micro_batch_size: int, progress: bool):
        """The activation statistics that :meth:`scores` and :meth:`compensate` read; None for most methods."""
        return None

    @abc.abstractmethod
    def scores(
        self,
        model: nn.Module,
        windows: torch.Tensor | None,
        *,
        micro_batch_size: int = 8,
        seed: int = 0,
        progress: bool = True,
        stats=None,
        **settings,
    ) -> Scores:
        """Every KV group's and MLP channel's score (``stats``: from :meth:`statistics`, gathered if None)."""

    def compensate(self, model: nn.Module, plan: PruningPlan, stats) -> nn.Module:
        """Change the DENSE model for ``plan`` before compaction; by default nothing. Returns ``model``."""
        return model

    def check_settings(self, settings: dict) -> None:
        """A ValueError naming the first keyword this method does not take."""
        for key in settings:
            if key not in self.settings:
                raise ValueError(f"{key}: method {self.name!r} takes no such setting (it takes {list(self.settings)})")

    def __repr__(self) -> str:
        return f"<method {self.name!r}: needs {self.needs}>"


class WeightsOnly(Method):
    """A data-free method: :func:`~nirvana.saliency.compute_scores` with its own ``saliency``; windows may be None."""

    needs = WEIGHTS_ONLY
    saliency: ClassVar[str]

    def scores(self, model, windows, *, micro_batch_size=8, seed=0, progress=True, stats=None, **settings) -> Scores:
        self.check_settings(settings)
        scores = compute_scores(
            model,
            windows,
            objective="maxlogit",
            saliency=self.saliency,
            micro_batch_size=micro_batch_size,
            progress=progress,
            seed=int(seed),
        )
        scores.meta["method"] = self.name
        return scores


class FromStatistics(Method):
    """A method that scores from activation statistics: :meth:`from_statistics` is its formula."""

    needs = ACTIVATIONS
    uses_statistics = True

    def statistics(self, model: nn.Module, windows: torch.Tensor, *, micro_batch_size: int, progress: bool):
        """This method's :class:`ActivationStats` of ``windows``."""
        return activation_statistics(model, windows, micro_batch_size=micro_batch_size, progress=progress)

    @abc.abstractmethod
    def from_statistics(self, model: nn.Module, stats, weights: WeightReductions = DENSE_WEIGHTS) -> Scores:
        """The scores from ``stats`` (an :class:`~nirvana.sources.activations.ActivationStats`); ``weights`` reads
        the weights (whole by default; :class:`nirvana.sources.fsdp.ShardedWeights` on an FSDP2-sharded model)."""

    def scores(self, model, windows, *, micro_batch_size=8, seed=0, progress=True, stats=None, **settings) -> Scores:
        """:meth:`from_statistics`, gathering the statistics first unless ``stats`` holds them."""
        self.check_settings(settings)
        if stats is None:
            stats = self.statistics(model, windows, micro_batch_size=micro_batch_size, progress=progress)
        return with_window_meta(self.from_statistics(model, stats), windows, micro_batch_size)


__all__ = [
    "ACTIVATIONS",
    "GRADIENTS",
    "NEEDS",
    "PER_WINDOW_GRADIENTS",
    "WEIGHTS_ONLY",
    "FromStatistics",
    "Method",
    "WeightsOnly",
]
