"""nirvana's scores as a Torch-Pruning importance (``pip install 'nirvana[torch-pruning]'``, torch-pruning 1.6.1).

:class:`NirvanaImportance` scores a dense Hugging Face decoder once with
:func:`nirvana.saliency.compute_scores` (max-logit Taylor saliency by default) and then answers
Torch-Pruning's ``importance(group)`` calls from those scores:

* an MLP group (gate/up output rows with the down_proj input column) gets, per channel, nirvana's
  score of that channel;
* an attention group (q/k/v output rows, o_proj input columns) gets, per row, the score of the KV
  group the row belongs to, so ``MetaPruner``'s ``imp.view(num_heads, -1).mean(1)`` ranks each query
  head by its KV group's score;
* any other group (the hidden size, the embeddings, norms) gets ``None``, which ``MetaPruner`` skips:
  nirvana has no score for it.

What it cannot express: NIRVANA removes whole KV groups (a k/v head with all its query heads).
Torch-Pruning's pruner prunes query heads uniformly inside each KV group and never k/v, and since every
query head of a KV group gets the same score here, which of them it drops is arbitrary. For
whole-KV-group removal use ``nirvana prune`` (or :func:`nirvana.compaction.compact_model` with a plan).

The scores index the dense model, so prune in one step (``iterative_steps=1``); a group whose
module is no longer its dense size raises a ValueError. Build Torch-Pruning's dependency graph with
``model.config.use_cache = False``: with the cache on, tracing a transformers Llama never finishes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_pruning.pruner.function import prune_linear_in_channels, prune_linear_out_channels
from torch_pruning.pruner.importance import Importance

from ..adapters import get_adapter
from ..compaction import check_dense
from ..saliency import compute_scores
from ..scores import Scores

__all__ = ["NirvanaImportance"]


class NirvanaImportance(Importance):
    """A Torch-Pruning importance that returns nirvana's scores for the groups it knows.

    Args:
        model: the dense Hugging Face decoder that Torch-Pruning will prune (scored as it is then).
        windows: integer ``[N, T]`` calibration token ids.
        objective, saliency, micro_batch_size: as in :func:`nirvana.saliency.compute_scores`.

    The scores are computed once, on the first call (or by :meth:`scores`), and kept in
    :attr:`computed`.
    """

    def __init__(self, model: nn.Module, windows, *, objective="maxlogit", saliency="taylor", micro_batch_size=8):
        self.model = model
        self.windows = windows
        self.objective = objective
        self.saliency = saliency
        self.micro_batch_size = micro_batch_size
        self.computed: Scores | None = None
        adapter = get_adapter(model)
        self.geometry = check_dense(model, adapter, "NirvanaImportance scores the dense model")
        # Each prunable linear -> (layer, role); looked up by identity, Torch-Pruning hands back the modules.
        self._roles: dict[int, tuple[int, str]] = {}
        for i, lm in enumerate(adapter.layers(model)):
            for role in ("q", "k", "v", "o", "gate", "up", "down"):
                module = getattr(lm, role)
                if module is not None:
                    self._roles[id(module)] = (i, role)

    def scores(self) -> Scores:
        """nirvana's :class:`Scores` of the dense model, computed on the first call."""
        if self.computed is None:
            self.computed = compute_scores(
                self.model,
                self.windows,
                objective=self.objective,
                saliency=self.saliency,
                micro_batch_size=self.micro_batch_size,
                progress=False,
            )
        return self.computed

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        """One float32 score per index of ``group``'s root, or None for a group nirvana does not score."""
        dep, idxs = group[0].dep, group[0].idxs
        module, handler = dep.target.module, dep.handler
        role = self._roles.get(id(module))
        if role is None:
            return None
        layer, name = role
        out = handler == prune_linear_out_channels
        if not out and handler != prune_linear_in_channels:
            return None
        # An input-channel group of q/k/v/gate/up or an output group of o/down is the hidden size.
        if out != (name not in ("o", "down")):
            return None
        g = self.geometry
        dense_width = {
            "q": g.num_heads * g.head_dim,
            "k": g.num_kv_heads * g.head_dim,
            "v": g.num_kv_heads * g.head_dim,
            "o": g.num_heads * g.head_dim,
            "gate": g.intermediate_size,
            "up": g.intermediate_size,
            "down": g.intermediate_size,
        }[name]
        width = module.out_features if out else module.in_features
        if width != dense_width:
            raise ValueError(
                f"group: {name}_proj of layer {layer} is {width} wide, not its dense {dense_width}; "
                "NirvanaImportance scores the dense model, prune in one step (iterative_steps=1)"
            )
        # Torch-Pruning's indices may be (idx, root_idx) pairs.
        index = torch.as_tensor([getattr(i, "idx", i) for i in idxs], dtype=torch.int64)
        s = self.scores()
        if name in ("gate", "up", "down"):
            return s.mlp[layer, index].clone()
        if name in ("q", "o"):
            return s.attention[layer, index // (g.group_size * g.head_dim)].clone()
        return s.attention[layer, index // g.head_dim].clone()
