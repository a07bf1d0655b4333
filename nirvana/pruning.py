"""The whole flow in one call: load, calibrate, score, allocate (with KL selection), compact, save.

``prune(PruneSettings(...))`` is what ``nirvana prune`` runs; every stage is also importable on its
own (see the package docstring). Settings are checked before anything heavy is loaded, so a bad flag
fails in a second, not after the model has loaded.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _remote_modeling as remote
from . import calibration, compensation, replan, selection
from .adapters import architecture_names, get_adapter
from .allocation import ALLOCATIONS, NORMALIZATIONS, allocate, check_rules
from .checkpoint import CONFIG_FILE, PLAN_FILE, REPORT_FILE, save_pruned
from .compaction import compact_model
from .methods import METHODS, get_method
from .objective import OBJECTIVES
from .output import check_target, real_path, scratch, staged
from .plan import Geometry
from .progress import library_bars, status
from .report import PLOT_FILE, build_report, plot_layers
from .saliency import SALIENCIES
from .scores import SCORES_FILE, Scores, mean_scores, save_scores
from .sources.activations import activation_statistics, merge_statistics
from .sources.gradients import check_aggregation

# accelerate's placements, passed to from_pretrained(device_map=...); "cpu" puts everything on the CPU.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential", "cpu")
# Each candidate calibration set is scored with a full backward pass and kept until the KL selection,
# and their seeds are listed up front: a few dozen is already a long study (the paper's uses 5-20).
MAX_SELECT_CALIB = 64
# --calib self samples every window in one batch with a KV cache, so memory grows with the count:
# 1024 windows of SmolLM2-135M at seq_len 128 already hold ~3 GiB of KV cache in bfloat16 (twice
# that in float32), and it is far more than a calibration set needs (the default is 32).
MAX_SELF_SAMPLES = 1024


# The published NIRVANA recipe (arXiv 2509.14230), what ``--recipe paper`` fixes: 32 windows of 128
# tokens, one calibration set, the plain sum of the windows' gradients, the unnormalised scores ranked
# globally, no layer protected and no compensation. gamma stays the user's number (the paper gives one per
# model); only "auto" is refused, as the paper chooses none.
RECIPES: dict[str, dict] = {
    "paper": dict(
        method="nirvana", num_samples=32, seq_len=128, select_calib=1, draws=1, saliency="taylor", objective="maxlogit",
        window_weight="none", trim=0.0, allocation="global", protect_layers=0, min_kv_groups=0, normalize="none",
        compensate=None,
    ),
}  # fmt: skip
PAPER_GAMMA = 3.0
# The default micro-batch holds this many tokens: 8 windows of 128, as before windows had a per-method length,
# so that NIRVANA's 512-token windows (2 a pass) hold no more activations than its 128-token ones did. The
# gradient sums are the same for any micro-batch; only --saliency adam's V counts micro-batches.
MICRO_BATCH_TOKENS = 1024
# A candidate's further calibration draws lie this far apart in seed (PruneSettings.candidate_seeds), so that
# runs with nearby seeds (0, 1, 2, ...) never share a draw; the 64 draws allowed span 2**26 seeds.
DRAW_SEED_STRIDE = 2**20


@dataclass
class PruneSettings:
    """Every flag of ``nirvana prune``; written into report.json as is, but for ``allocation``, which is
    written as used (the method's own when None, see :attr:`resolved_allocation`).

    ``recipe="paper"`` marks settings that must be the published ones (:data:`RECIPES`); build them with
    :meth:`for_recipe`, which fills in the recipe and refuses what contradicts it."""

    model: str = "smollm2"
    method: str = "nirvana"  # or a baseline: magnitude, random, taylor, wanda-sp, flap (nirvana.methods)
    sparsity: float = 0.2
    gamma: float | str = 3.0  # or "auto": chosen from selection.GAMMA_GRID by held-out KL
    calib: str = "austen"
    num_samples: int = 32
    seq_len: int | None = None  # None: the method's default (Method.seq_len: nirvana 512, the baselines 128)
    select_calib: int = 1  # K candidate calibration sets; candidate c's first draw has seed seed + c
    # Each candidate's scores are the mean of this many calibration draws' (nirvana.scores.mean_scores), its
    # activation statistics their pooled windows' (see candidate_seeds). None: the method's default
    # (Method.draws: nirvana 4, the baselines 1), 1 with --scores.
    draws: int | None = None
    heldout_samples: int = 16  # windows of seq_len tokens for the KL criterion
    saliency: str = "taylor"
    objective: str = "maxlogit"
    # With --saliency adam: V from an AdamW's exp_avg_sq after this many steps at learning rate 0 on the
    # calibration windows (one micro-batch a step); 0: the mean squared micro-batch gradient.
    adam_steps: int = 0
    # Robust aggregation of the windows' gradients (nirvana.sources.gradients): each window's gradient divided
    # by its norm ("norm") or objective value ("objective") before the sum; the ceil(trim * N) windows with the
    # largest gradient norms left out. One window per backward pass; NIRVANA's taylor saliency only.
    window_weight: str = "none"
    trim: float = 0.0
    allocation: str | None = None  # None: the method's own (Method.allocation); "global" or "uniform" overrides it
    round_to: int = 8
    # Allocation rules (nirvana.allocation): the first N layers keep everything; every attention block keeps
    # at least K KV groups; per-layer "mean"/"median" scaling of the scores before the global ranking.
    protect_layers: int | None = None  # None: the method's default (Method.protect_layers), resolved per model
    min_kv_groups: int = 0
    normalize: str = "none"
    micro_batch_size: int | None = None  # None: MICRO_BATCH_TOKENS // seq_len windows (8 at 128 tokens, 2 at 512)
    device: str | None = None  # None: CUDA when present
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    distributed: str | None = None  # "fsdp": score on all torchrun ranks with FSDP2 (nirvana.distributed)
    device_map: str | None = None  # accelerate's device_map ("auto", ...): one process over several GPUs
    # A scores.safetensors from an earlier run (or the pruned folder holding it): allocate from it, with no
    # calibration and no backward pass (see nirvana.replan).
    scores: str | None = None
    # "bias": FLAP's bias compensation (nirvana.compensation) for any method, from activation statistics of
    # the calibration windows; None: only a method's own (FLAP's, which is that same compensation).
    compensate: str | None = None
    recipe: str | None = None  # "paper": the published settings (RECIPES), checked; None: the tool's defaults

    @classmethod
    def for_recipe(cls, recipe: str | None, **given) -> PruneSettings:
        """Settings from ``given``, the rest from ``recipe`` (:data:`RECIPES`), or the defaults when it is None.

        A ValueError, one line, for an unknown recipe or a ``given`` value the recipe fixes otherwise.
        """
        if recipe is None:
            return cls(**given)
        fixed = _recipe(recipe)
        for name, value in given.items():
            if name in fixed and value != fixed[name]:
                raise ValueError(
                    f"{name}: --recipe {recipe} fixes it to {fixed[name]!r}, got {value!r}; drop one of the two"
                )
        return cls(**{**fixed, "gamma": PAPER_GAMMA, **given, "recipe": recipe})

    def _check_recipe(self) -> None:
        if self.recipe is None:
            return
        for name, value in _recipe(self.recipe).items():
            # None is the method's own allocation, which is the recipe's when the method is.
            have = getattr(self, name)
            if self.method in METHODS and name in ("allocation", "seq_len", "draws"):
                have = getattr(self, f"resolved_{name}")
            if have != value:
                raise ValueError(
                    f"{name}: --recipe {self.recipe} fixes it to {value!r}, got {have!r} "
                    "(PruneSettings.for_recipe fills the recipe in)"
                )
        if self.gamma == "auto":
            raise ValueError(f"gamma: --recipe {self.recipe} takes a number (the paper's choice), got 'auto'")

    def check(self) -> None:
        """ValueError naming the first bad setting; cheap, so it runs before anything loads.

        Besides each flag's own range: the model path exists and is not a pruned checkpoint, the
        calibration source exists and is readable (``calibration.check_source``; no text is read), the
        candidate sets and ``self`` windows are bounded, and every calibration seed fits in 31 bits.
        """
        self._check_recipe()
        compensation.check_compensate(
            self.compensate, method=get_method(self.method), distributed=self.distributed, scores=self.scores
        )
        self._check_placement()
        self._check_scores()
        if not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity: must be in [0, 1), got {self.sparsity!r}")
        if self.gamma != "auto":
            if (
                isinstance(self.gamma, bool)
                or not isinstance(self.gamma, (int, float))
                or not math.isfinite(self.gamma)
            ):
                raise ValueError(f"gamma: must be a positive number or 'auto', got {self.gamma!r}")
            if self.gamma <= 0:
                raise ValueError(f"gamma: must be > 0, got {self.gamma!r}")
        choices_by_name = (
            ("method", METHODS),
            ("saliency", SALIENCIES),
            ("objective", OBJECTIVES),
        )
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"allocation: must be one of {', '.join(ALLOCATIONS)} (or None: the method's own), "
                f"got {self.allocation!r}"
            )
        for name, choices in choices_by_name:
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in (
            "num_samples", "seq_len", "select_calib", "draws", "heldout_samples", "round_to", "micro_batch_size",
        ):  # fmt: skip
            value = getattr(self, name)
            if name in ("seq_len", "draws", "micro_batch_size") and value is None:
                continue  # the method's default, resolved by for_geometry
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("protect_layers", "min_kv_groups"):
            value = getattr(self, name)
            if name == "protect_layers" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize: must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.normalize != "none" and self.resolved_allocation != "global":
            raise ValueError(
                f"normalize: {self.normalize!r} needs global allocation (it cannot change a per-layer order), "
                f"got --allocation {self.resolved_allocation}"
            )
        self._check_adam_steps()
        self._check_aggregation()
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device: must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} asked for, but no CUDA GPU is available")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: must be float32, bfloat16 or float16, got {self.dtype!r}")
        self._check_model()
        self._check_calibration()
        if self.out is not None:
            from .models import looks_like_path

            # What the run reads: the output may be none of these, nor inside or around one.
            sources = [self.model] if looks_like_path(self.model) or Path(self.model).expanduser().exists() else []
            if self.scores is not None:
                sources.append(replan.scores_file(self.scores))
            check_target(self.out, sources=sources, overwrite=self.overwrite, name="out")

    def _check_model(self) -> None:
        from .models import looks_like_path

        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model: must be a model folder, .gguf file, hub name or 'smollm2', got {self.model!r}")
        path = Path(self.model).expanduser()
        if looks_like_path(self.model) and not path.exists():
            raise ValueError(f"model: {self.model!r} does not exist")
        if path.is_dir() and ((path / PLAN_FILE).is_file() or remote.BLOCK_KEY in _local_config(path)):
            raise ValueError(
                f"model: {self.model!r} is a pruned checkpoint; prune the dense model it came from instead "
                f"(the {PLAN_FILE} in it names the settings; its {SCORES_FILE} lets --scores re-plan without a "
                "backward pass)"
            )

    def _check_calibration(self) -> None:
        calibration.check_source(self.calib)
        if self.calib == calibration.SELF:
            for name in ("num_samples", "heldout_samples"):
                if getattr(self, name) > MAX_SELF_SAMPLES:
                    raise ValueError(
                        f"{name}: at most {MAX_SELF_SAMPLES} with --calib self (each is a sequence sampled "
                        f"from the model, all in one batch), got {getattr(self, name)}"
                    )
        if self.select_calib > MAX_SELECT_CALIB:
            raise ValueError(f"select_calib: at most {MAX_SELECT_CALIB} candidate sets, got {self.select_calib}")
        draws = self.resolved_draws
        if self.select_calib * draws > MAX_SELECT_CALIB:
            default = f" ({self.method}'s default; pass --draws 1 for one)" if self.draws is None else ""
            raise ValueError(
                f"draws: {draws} draws{default} for each of {self.select_calib} candidate sets make "
                f"{self.select_calib * draws} calibration draws, at most {MAX_SELECT_CALIB}"
            )
        top = calibration.HELDOUT_SEED_BASE - 1
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= top:
            raise ValueError(f"seed: must be an integer in [0, 2**31), got {self.seed!r}")
        last = self.candidate_seeds()[-1][-1]
        if last > top:
            flags = f"--select-calib {self.select_calib}" + (f" --draws {draws}" if draws > 1 else "")
            raise ValueError(
                f"seed: {self.seed} with {flags} uses seeds up to {last}, past 2**31 - 1; pass a smaller --seed"
            )

    def candidate_seeds(self) -> list[list[int]]:
        """Each candidate calibration set's draws' seeds: candidate ``c`` draws ``seed + c + k * DRAW_SEED_STRIDE``
        for ``k`` below ``draws``. One draw is the seed itself, as it always was; the further draws lie
        :data:`DRAW_SEED_STRIDE` apart, so runs whose seeds differ by less share none of them."""
        return [
            [self.seed + c + k * DRAW_SEED_STRIDE for k in range(self.resolved_draws)] for c in range(self.select_calib)
        ]

    def _check_placement(self) -> None:
        if self.device_map is not None:
            if self.device_map not in DEVICE_MAPS:
                raise ValueError(f"device_map: must be one of {', '.join(DEVICE_MAPS)}, got {self.device_map!r}")
            if self.distributed is not None or self.device is not None:
                other = "distributed" if self.distributed is not None else "device"
                raise ValueError(f"device_map: {self.device_map!r} places the model itself; drop --{other}")
        if self.distributed is not None:
            from .distributed import check_launch, check_method
            from .rank_load import check_source

            check_source(self.model)
            check_launch(self.distributed, self.device)
            check_method(self.method, self.saliency)

    def _check_adam_steps(self) -> None:
        steps = self.adam_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"adam_steps: must be a non-negative integer, got {steps!r}")
        if not steps:
            return
        if self.method != "nirvana" or self.saliency != "adam":
            raise ValueError(
                f"adam_steps: {steps} needs --method nirvana --saliency adam, got --method {self.method} "
                f"--saliency {self.saliency}"
            )
        if self.distributed is not None:
            raise ValueError("adam_steps: not under --distributed (an optimizer over the shards is Python-API only)")
        if self.scores is not None:
            raise ValueError("adam_steps: --scores re-plans saved scores; there is nothing to step")

    def _check_aggregation(self) -> None:
        check_aggregation(self.window_weight, self.trim)
        if self.window_weight == "none" and not self.trim:
            return
        flag = f"--window-weight {self.window_weight}" if self.window_weight != "none" else f"--trim {self.trim}"
        if self.method != "nirvana" or self.saliency != "taylor":
            raise ValueError(
                f"window_weight: {flag} weighs NIRVANA's gradient sum, needs --method nirvana --saliency taylor, "
                f"got --method {self.method} --saliency {self.saliency}"
            )
        if self.distributed is not None:
            raise ValueError(f"window_weight: {flag} is not under --distributed (the ranks sum micro-batch gradients)")
        if self.scores is not None:
            raise ValueError(f"window_weight: {flag} changes scoring, but --scores re-plans saved scores")

    def _check_scores(self) -> None:
        if self.scores is not None:
            replan.check_settings(self)

    def calibration_windows(self, tokenizer, seed: int, model=None, progress: bool = False) -> torch.Tensor:
        """The calibration windows these settings draw with ``seed`` (``model`` only for the "self" source)."""
        return calibration.calibration_windows(
            self.calib,
            tokenizer,
            num_samples=self.num_samples,
            seq_len=self.resolved_seq_len,
            seed=seed,
            model=model,
            progress=progress,
        )

    @property
    def rules(self) -> dict:
        """The allocation rules, as :func:`nirvana.allocation.allocate` takes them by name; after
        :meth:`for_geometry` (``protect_layers`` None is a per-model default)."""
        if self.protect_layers is None:
            raise ValueError("protect_layers: None is resolved per model; call PruneSettings.for_geometry first")
        return {"protect_layers": self.protect_layers, "min_kv_groups": self.min_kv_groups, "normalize": self.normalize}

    def for_geometry(self, geometry: Geometry) -> PruneSettings:
        """These settings with the method's defaults filled in (``protect_layers`` for this model, ``seq_len``,
        ``draws``, ``micro_batch_size``), the rules checked against it (:func:`nirvana.allocation.check_rules`); what
        report.json then records."""
        protect = get_method(self.method).resolve_protect_layers(
            self.protect_layers, geometry.num_layers, self.resolved_allocation
        )
        settings = replace(
            self,
            protect_layers=protect,
            seq_len=self.resolved_seq_len,
            draws=self.resolved_draws,
            micro_batch_size=self.resolved_micro_batch_size,
        )
        check_rules(geometry, **settings.rules)
        return settings

    @property
    def resolved_seq_len(self) -> int:
        """The calibration window length this run uses: ``seq_len``, or the method's default when it is None."""
        return get_method(self.method).resolve_seq_len(self.seq_len)

    @property
    def resolved_draws(self) -> int:
        """The calibration draws each candidate averages: ``draws``, or when it is None the method's default,
        or 1 with ``scores`` (saved scores are one set, made already)."""
        if self.draws is None and self.scores is not None:
            return 1
        return get_method(self.method).resolve_draws(self.draws)

    @property
    def resolved_micro_batch_size(self) -> int:
        """``micro_batch_size``, or when it is None as many windows as :data:`MICRO_BATCH_TOKENS` holds (at least 1)."""
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        return max(1, MICRO_BATCH_TOKENS // self.resolved_seq_len)

    @property
    def resolved_allocation(self) -> str:
        """The allocation this run uses: ``allocation``, or the method's own when it is None."""
        return get_method(self.method).resolve_allocation(self.allocation)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else getattr(torch, self.dtype)


def _recipe(name: str) -> dict:
    if name not in RECIPES:
        raise ValueError(f"recipe: must be one of {', '.join(RECIPES)}, got {name!r}")
    return RECIPES[name]


def _local_config(folder: Path) -> dict:
    """A model folder's config.json as a dict, or {} when it cannot be read: the loader reports that itself."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return config if isinstance(config, dict) else {}


@dataclass
class PruneResult:
    model: nn.Module  # compacted in place
    tokenizer: object
    plan: object
    scores: Scores
    report: dict
    out: Path | None
    # --distributed with a compensating method (FLAP): its biases, float64 by parameter name
    biases: dict | None = None


class _Timer(dict):
    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a tied lm_head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prune(
    settings: PruneSettings,
    *,
    model: nn.Module | None = None,
    tokenizer=None,
    progress: bool = True,
    extra_report: dict | None = None,
    precomputed_scores: dict[int, Scores] | None = None,
    precomputed_stats: dict[int, object] | None = None,
) -> PruneResult:
    """Run the NIRVANA flow. With ``model``/``tokenizer`` given, ``settings.model`` is only a label.

    The model is compacted in place. With ``settings.out``, the checkpoint (weights, config, tokenizer,
    plan.json, report.json, scores.safetensors and the per-layer plot) is written atomically there.
    ``precomputed_scores`` maps each calibration seed to its scores, which are then not computed again
    (how rank 0 finishes a ``settings.distributed`` run, whose ranks score with ``nirvana.distributed``);
    ``precomputed_stats`` maps seeds to the activation statistics those scores came from, for a method
    that compensates from them (FLAP).
    """
    from .models import load_model

    if settings.distributed is not None and precomputed_scores is None:
        if model is not None:
            raise ValueError("model: under distributed each rank loads settings.model itself; pass no model")
        return _prune_distributed(settings, progress=progress, extra_report=extra_report)
    settings.check()
    timer = _Timer()
    device = settings.torch_device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with timer.stage("load"), library_bars(progress):
        if model is None:
            model, tokenizer = load_model(
                settings.model, device=device, dtype=settings.torch_dtype, device_map=settings.device_map
            )
    device = next(model.parameters()).device
    _warn_past_positions(settings, model.config)
    _warn_allocation(settings)
    allocation = settings.resolved_allocation
    adapter = get_adapter(model)
    geometry = adapter.geometry(model.config)
    settings = settings.for_geometry(geometry)  # before any scoring: N or K too large for this model
    _check_encoder_decoder(settings, model)
    architecture = architecture_names(model)[0]
    params_before = count_params(model)

    seeds = [seed for group in settings.candidate_seeds() for seed in group]
    saved = None  # --scores: the one candidate comes from the file
    if settings.scores is not None:
        saved = replan.load_matching(settings.scores, geometry, settings.method)
        seed = settings.seed if saved.seed is None else saved.seed
        seeds, precomputed_scores = [seed], {seed: saved.scores}
    method = get_method(settings.method)
    compensate = compensation.compensation_for(method, settings.compensate)
    # calibration seed -> the method's activation statistics, or those its compensation reads, if any
    draw_stats: dict[int, object] = dict(precomputed_stats or {})
    draw_scores: dict[int, Scores] = {}
    for seed in tqdm(seeds, desc="calibration sets", unit="set", disable=not progress or len(seeds) == 1):
        if precomputed_scores is not None:
            draw_scores[seed] = precomputed_scores[seed]
        else:
            with timer.stage("calibration"):
                windows = settings.calibration_windows(tokenizer, seed, model, progress=progress)
            with timer.stage("saliency"):
                draw_scores[seed] = _method_scores(settings, method, model, windows, seed, progress, draw_stats)
    if saved is not None:
        candidates, method_stats = [selection.Candidate(seeds[0], saved.scores)], draw_stats
    else:
        candidates, method_stats = _candidates(settings, draw_scores, draw_stats)

    gammas = _gammas(settings)
    chosen = None
    if len(candidates) > 1 or len(gammas) > 1:
        with timer.stage("calibration"):
            heldout = calibration.heldout_windows(
                settings.calib,
                tokenizer,
                num_samples=settings.heldout_samples,
                seq_len=settings.seq_len,
                seed=settings.seed,
                model=model,
                progress=progress,
            )
        with timer.stage("selection"):
            chosen = selection.select(
                model,
                candidates,
                heldout,
                sparsity=settings.sparsity,
                gammas=gammas,
                allocation=allocation,
                round_to=settings.round_to,
                architecture=architecture,
                prepare=None if compensate is None else _prepare(compensate, method_stats),
                progress=progress,
                rules=settings.rules,
            )
        plan, best = chosen.plan, next(c for c in candidates if c.seed == chosen.seed)
    else:
        best = candidates[0]
        with timer.stage("allocation"):
            plan = allocate(
                best.scores.attention,
                best.scores.mlp,
                geometry,
                sparsity=settings.sparsity,
                gamma=gammas[0],
                allocation=allocation,
                round_to=settings.round_to,
                architecture=architecture,
                **settings.rules,
            )
    calib = settings.calib if saved is None else saved.calib
    plan.meta.update(
        {"method": settings.method, "calibration_seed": best.seed, "calib": calib, "compensate": settings.compensate}
    )

    with timer.stage("compaction"):
        if compensate is not None:
            compensate(model, plan, method_stats.get(best.seed))
        compact_model(model, plan)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    params_after = count_params(model)

    extra = dict(extra_report or {})
    if saved is not None:
        extra["scores_from"] = saved.report()
    extra["selection"] = _selection_record(chosen, best, gammas)
    report = build_report(
        settings=asdict(settings) | {"allocation": allocation},  # the one used, the method's own if not given
        plan=plan,
        params_before=params_before,
        params_after=params_after,
        timings=dict(timer),
        device=device,
        extra=extra,
    )
    out = None
    if settings.out is not None:
        with (
            timer.stage("save"),
            status(f"saving the pruned model to {settings.out}", progress),
            library_bars(progress),
        ):
            out = save_checkpoint(
                model, tokenizer, plan, best.scores, report, settings.out, settings.overwrite,
                compensated_from=None if compensate is None else method_stats.get(best.seed),
            )  # fmt: skip
        report["timings_s"]["save"] = round(timer["save"], 3)
    return PruneResult(model, tokenizer, plan, best.scores, report, out)


def _prune_distributed(settings: PruneSettings, *, progress: bool, extra_report: dict | None) -> PruneResult:
    """``nirvana prune --distributed fsdp``: load rank-locally and score on all ranks, select on all ranks,
    then rank 0 streams the pruned checkpoint from the dense safetensors (no dense model anywhere).

    Every rank returns a :class:`PruneResult` holding the chosen scores and the plan (and FLAP's
    compensation biases, float64 by parameter name, in ``biases``); ``model`` is None everywhere
    (nothing is compacted in memory), and only rank 0's has the report and the output folder.
    """
    from . import distributed

    settings.check()
    settings = _for_config(settings)
    timer = _Timer()
    run = distributed.score_on_ranks(settings, progress=progress)
    timer.update(run.report["timings_s"])
    rank0 = run.info.rank == 0
    show = progress and rank0
    method = get_method(settings.method)
    if rank0:
        _warn_allocation(settings)
    allocation = settings.resolved_allocation
    sharded_compensation = compensation.sharded_compensation_for(method, settings.compensate)
    architecture = architecture_names(run.sharded.lm)[0]
    candidates, stats = _candidates(settings, run.scores, run.stats)
    gammas = _gammas(settings)
    chosen = None
    if len(candidates) > 1 or len(gammas) > 1:
        with timer.stage("calibration"):
            heldout = distributed.sharded_calibration(run.sharded, settings, run.tokenizer, settings.seed, heldout=True)
        with timer.stage("selection"):
            chosen = distributed.select_on_ranks(
                run.sharded, candidates, heldout, sparsity=settings.sparsity, gammas=gammas,
                allocation=allocation, round_to=settings.round_to, architecture=architecture,
                compensation=sharded_compensation, stats=stats, progress=show, rules=settings.rules,
            )  # fmt: skip
        plan, best = chosen.plan, next(c for c in candidates if c.seed == chosen.seed)
    else:
        best = candidates[0]
        with timer.stage("allocation"):
            plan = allocate(
                best.scores.attention, best.scores.mlp, best.scores.geometry, sparsity=settings.sparsity,
                gamma=gammas[0], allocation=allocation, round_to=settings.round_to, architecture=architecture,
                **settings.rules,
            )  # fmt: skip
    plan.meta.update(
        {"method": settings.method, "calibration_seed": best.seed, "calib": settings.calib}
        | {"compensate": settings.compensate}
    )
    biases = None
    if sharded_compensation is not None:
        with timer.stage("compaction"):
            biases = sharded_compensation(run.sharded, plan, stats[best.seed])
    run.drop_model()
    try:
        result = _finish_on_rank_0(
            settings, run, plan, best, chosen=chosen, gammas=gammas, biases=biases, timer=timer,
            extra_report=extra_report, progress=progress, stats=stats,
        )  # fmt: skip
    except BaseException:
        if rank0:  # release the others, then fail with rank 0's own error
            distributed.share_plan(run, None, failed=True)
        raise
    seed, plan = distributed.share_plan(run, None if result is None else result.plan)
    if result is not None:
        return result
    scores = next(c.scores for c in candidates if c.seed == seed)
    return PruneResult(None, run.tokenizer, plan, scores, {"distributed": run.report}, None, biases)


def _for_config(settings: PruneSettings) -> PruneSettings:
    """:meth:`PruneSettings.for_geometry` from the checkpoint's config, on every rank before any scores."""
    from transformers import AutoConfig

    from .rank_load import checkpoint_folder

    config = AutoConfig.from_pretrained(checkpoint_folder(settings.model))
    return settings.for_geometry(get_adapter(config).geometry(config))


def _finish_on_rank_0(
    settings: PruneSettings, run, plan, best, *, chosen, gammas, biases, timer, extra_report, progress: bool, stats
) -> PruneResult | None:
    """Rank 0's report and streamed checkpoint (None on the other ranks): ``run`` is the
    :class:`nirvana.distributed.RankScores`, ``best`` the chosen candidate, ``chosen`` the KL selection or None."""
    from .apply import DEFAULT_MAX_SHARD_SIZE, parse_size, prepare_stream, write_stream
    from .rank_load import checkpoint_params

    result = None
    if run.info.rank == 0:
        extra = dict(extra_report or {}, distributed=run.report)
        extra["selection"] = _selection_record(chosen, best, gammas)
        # The output's tensors, from the dense headers and the plan: what the stream writes and counts.
        stream = prepare_stream(run.folder, plan, dtype=run.settings.torch_dtype, biases=biases)
        report = build_report(
            settings=asdict(settings) | {"allocation": settings.resolved_allocation},
            plan=plan,
            params_before=checkpoint_params(run.folder),
            params_after=sum(math.prod(s.shape) for s in stream.specs),
            timings=dict(timer),
            device=run.info.device,
            extra=extra,
        )
        out = None
        if settings.out is not None:
            with (
                timer.stage("save"),
                status(f"writing the pruned model to {settings.out}", progress),
                staged(settings.out, overwrite=settings.overwrite, sources=[run.folder], name="out") as tmp,
            ):
                write_stream(stream, plan, tmp, max_bytes=parse_size(DEFAULT_MAX_SHARD_SIZE), device=run.info.device)
                save_scores(best.scores, tmp / SCORES_FILE)
                if biases is not None:
                    compensation.save_means(stats[best.seed], tmp / compensation.MEANS_FILE)
                plot_layers(plan, tmp / PLOT_FILE)
                (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
            out = real_path(settings.out)
            report["timings_s"]["save"] = round(timer["save"], 3)
        result = PruneResult(None, run.tokenizer, plan, best.scores, report, out, biases)
    return result


def _warn_past_positions(settings: PruneSettings, config) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and settings.resolved_seq_len > limit:
        warnings.warn(
            f"seq_len: {settings.resolved_seq_len} is longer than the model's max_position_embeddings ({limit}); "
            "it never saw positions past that, so windows that long may score it badly",
            RuntimeWarning,
            stacklevel=3,
        )


def _tagged(settings: PruneSettings, seed: int, scores: Scores) -> Scores:
    """``scores`` with what made them in ``meta``, so that `prune --scores` can check it (and report.json say it)."""
    scores.meta.setdefault("method", settings.method)
    scores.meta.update(calib=settings.calib, calibration_seed=seed)
    return scores


def _candidates(settings: PruneSettings, scores: dict, stats: dict) -> tuple[list[selection.Candidate], dict]:
    """The candidate calibration sets from each draw's ``scores`` and ``stats`` (both by seed), and each
    candidate's statistics by its seed (its first draw's). A candidate of several draws
    (:meth:`PruneSettings.candidate_seeds`) scores their mean (:func:`nirvana.scores.mean_scores`) and pools
    their windows' statistics (:func:`nirvana.sources.activations.merge_statistics`)."""
    candidates, pooled = [], {}
    for group in settings.candidate_seeds():
        draws = [_tagged(settings, seed, scores[seed]) for seed in group]
        candidates.append(selection.Candidate(group[0], draws[0] if len(draws) == 1 else mean_scores(draws)))
        if all(seed in stats for seed in group):
            pooled[group[0]] = merge_statistics([stats[seed] for seed in group])
    return candidates, pooled


def _gammas(settings: PruneSettings) -> list[float]:
    """The gammas to try: the KL-selection grid for ``--gamma auto``, else the one given."""
    return list(selection.GAMMA_GRID) if settings.gamma == "auto" else [float(settings.gamma)]


def _selection_record(chosen, best, gammas: list[float]) -> dict:
    """report.json's ``selection``: the KL choice and its trials, or the one candidate and gamma."""
    if chosen:
        return {"seed": chosen.seed, "gamma": chosen.gamma, "kl": chosen.kl, "trials": chosen.trials}
    return {"seed": best.seed, "gamma": gammas[0], "trials": []}


def _warn_allocation(settings: PruneSettings) -> None:
    line = get_method(settings.method).allocation_warning(settings.resolved_allocation)
    if line is not None:
        warnings.warn(line, RuntimeWarning, stacklevel=3)


def _check_encoder_decoder(settings: PruneSettings, model) -> None:
    """Encoder-decoders (T5) take every method whose scores mean something there (FLAP's compensation does not)."""
    get_method(settings.method).check_model(model)
    compensation.check_model(settings.compensate, model)


def _method_scores(settings: PruneSettings, method, model, windows, seed: int, progress: bool, kept: dict) -> Scores:
    """One calibration set's scores by ``method``, keeping the activation statistics of ``windows`` in
    ``kept[seed]`` for the compensation: the method's own if it reads any, else gathered for
    ``settings.compensate`` alone (:func:`nirvana.compensation.needs_statistics`)."""
    mbs = settings.micro_batch_size
    stats = method.statistics(model, windows, micro_batch_size=mbs, progress=progress)
    if stats is not None:
        kept[seed] = stats
    elif compensation.needs_statistics(method, settings.compensate):
        kept[seed] = activation_statistics(model, windows, micro_batch_size=mbs, progress=progress)
    options = {name: getattr(settings, name) for name in method.settings}
    return method.scores(model, windows, micro_batch_size=mbs, seed=seed, progress=progress, stats=stats, **options)


def _prepare(compensate, kept: dict):
    """KL selection's ``prepare`` hook: ``compensate`` (:func:`nirvana.compensation.compensation_for`) of each
    candidate's dense copy, from that candidate's statistics in ``kept``."""

    def prepare(copy, plan, candidate):
        compensate(copy, plan, kept[candidate.seed])

    return prepare


def save_checkpoint(
    model, tokenizer, plan, scores: Scores, report: dict, out, overwrite: bool, compensated_from=None
) -> Path:
    """Write the pruned model with its scores, report and plot, all in one atomic rename; with the
    activation statistics a bias compensation ran from (``compensated_from``), their means too
    (:data:`nirvana.compensation.MEANS_FILE`, which ``nirvana apply`` reproduces the biases from)."""
    # Beside the output, not in /tmp: a run killed here leaves a folder the next run removes.
    with scratch(out) as tmp:
        scores_path = save_scores(scores, tmp / SCORES_FILE)
        plot_path = plot_layers(plan, tmp / PLOT_FILE)
        extra = {SCORES_FILE: scores_path, PLOT_FILE: plot_path}
        if compensated_from is not None:
            extra[compensation.MEANS_FILE] = compensation.save_means(compensated_from, tmp / compensation.MEANS_FILE)
        return save_pruned(
            model,
            tokenizer,
            plan,
            out,
            overwrite=overwrite,
            report=report,
            extra_files=extra,
        )
