"""Sources: what scorers read from a model and its calibration windows, one small module each.

* :mod:`~nirvana.sources.gradients`: single process, micro-batched: the full-batch gradient of an
  objective (summed in float32), optionally the mean squared per-micro-batch gradient (Adam's second
  moment without the EMA), or an optimizer's own second moment.
* :mod:`~nirvana.sources.per_window`: each window's own gradient, accumulated as ``sum_s |w * g_s|``
  (for methods such as LLM-Pruner's Taylor term that need it per window).
* :mod:`~nirvana.sources.activations`: running float64 sums of ``x`` and ``x**2`` per input channel of
  every prunable linear (Wanda-SP, FLAP).
* :mod:`~nirvana.sources.fsdp`: the same quantities under FSDP2, local shards reduced across ranks.

:mod:`~nirvana.sources.common` holds the checks and the scoring state they share. A scorer
(:mod:`nirvana.methods`) declares which source it ``needs`` and turns what it reads into
:class:`~nirvana.scores.Scores`.
"""
