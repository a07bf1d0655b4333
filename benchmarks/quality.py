"""What comes out: perplexity of pruned models by method and sparsity, on two held-out domains.

Every method goes through the same flow (calibration windows, allocation, compaction); only its scores,
and FLAP's bias compensation, are its own. Each pruned model is scored on:

* perplexity on the first ``--windows`` non-overlapping ``--seq-len``-token windows of each evaluation text:
  ``persuasion`` (the held-out Austen novel, the calibration domain) and ``fortunes`` (Debian's fortune
  collections, another domain, fetched by ``nirvana.corpus.fortunes_path``);
* KL(dense || pruned), token mean, on the same windows of the first evaluation text;
* achieved sparsity (attention+MLP linear parameters) and parameter count, so no method is compared at
  another size.

Data-dependent methods run once per calibration seed (``--seeds``, 5 by default); tables give mean ± sample
standard deviation (n - 1) over seeds, and so do the plot's error bars. Each method uses the allocation
``nirvana prune --method M`` uses by default, its paper's (``Method.allocation`` in ``nirvana.methods``), unless
``--allocation`` is given: NIRVANA and FLAP rank globally (FLAP's scores are standardised per layer for exactly
that), LLM-Pruner (``taylor``), Wanda-SP, magnitude and random prune the same share of every layer.
Each row prunes as ``nirvana prune --method M`` does with no other flag, so ``nirvana`` keeps layer 0 whole
(``Method.protect_layers``); ``nirvana-paper`` is ``--recipe paper``, the published settings, and
``nirvana-uniform`` (NIRVANA scores, uniform allocation, i.e. ``--allocation uniform``) separates the two
ingredients (:data:`ROW_FLAGS`).

Studies (``--studies``), on calibration-side data only, never on the evaluation texts:

* ``select``: KL selection of the calibration set. Among the ``--seeds`` NIRVANA calibration sets, the
  one whose pruned model has the lowest KL to the dense model on the calibration text's held-out tail
  (``nirvana.selection.select``, as ``--select-calib K`` does) against the mean over the seeds. Its record
  is keyed by the number of seeds, so a run with more seeds selects afresh.
* ``gamma``: NIRVANA (seed 0) at gamma 1, 2, 3, 4 and ``auto`` (chosen by the same calibration-side KL from
  ``selection.GAMMA_GRID``).
* ``variance`` (not run by default): NIRVANA variants (:data:`VARIANTS`: ``paper``, the published recipe, and
  what each other one changes: more or longer windows, protected first layers, a KV-group floor, per-layer
  normalisation, gamma 6 or auto, KL selection among K draws, the mean of K draws' scores, Adam-scaled
  saliency, bias compensation, each window's gradient normalised or the largest ones trimmed) over
  ``--variance-seeds`` calibration seeds, with the between-seed overlap of the pruned units and the scoring
  time per candidate; ``--variants`` picks some, in order. Row seed s scores
  calibration seed s; a variant needing K draws scores s, s+S, s+2S, ... (S seeds), so rows never share one.
  Tables give mean ± sample standard deviation, and rank the variants by mean perplexity.

``methods`` (every ``--methods`` row) is a study too, in the default ``--studies methods select gamma``.

``--recover N`` adds, for ``nirvana``, ``flap`` and ``taylor`` (:data:`RECOVER_METHODS`; FLAP with its
compensation biases, which the saved checkpoint carries), pruned from each calibration seed 0 to
``--recover-seeds`` - 1 (3 by default) at ``--recover-sparsity``, the perplexity after N LoRA steps of
``nirvana finetune`` on the calibration text (its windows seeded with the same seed); the table gives mean ±
sample std over those seeds, before and after. A record written before recovery had seeds
(``recover|M|s=...|steps=N``) is seed 0's.

Results go to ``<out>/quality-<model>.json`` as they come (a rerun with the same settings skips what is
there, so an interrupted run resumes), then ``quality-<model>.md`` (tables) and ``quality-<model>.png``.
``--tag NAME`` makes them ``quality-<model>-NAME.*``: a study at another evaluation size (``--windows``) then
leaves the committed results alone. A results file made with other settings is never overwritten: the run
stops with one line naming it.

Usage:
    python benchmarks/quality.py [--model smollm2|FOLDER] [--calib austen|PATH]
        [--eval persuasion fortunes PATH ...] [--methods nirvana taylor ...] [--sparsities 0.2 0.3 0.4 0.5]
        [--seeds 5] [--first-seed 0] [--scores-cache DIR] [--windows 24] [--seq-len 512] [--num-samples 32]
        [--calib-seq-len N]
        [--studies methods select gamma variance] [--variance-seeds 5] [--variants paper protect-1 ...]
        [--tag NAME] [--recover N] [--recover-sparsity 0.3] [--recover-seeds 3] [--out benchmarks/results]
        [--render-only] [--merge FILE ...]
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import torch

try:
    import nirvana  # noqa: F401
except ImportError:  # a bare checkout that was never pip-installed: use this repository's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nirvana import baselines, calibration, compensation, corpus, selection
from nirvana.adapters import get_adapter
from nirvana.allocation import allocate
from nirvana.evaluation import kl_divergence, text_windows
from nirvana.methods import get_method
from nirvana.models import load_model
from nirvana.pruning import PruneSettings, count_params
from nirvana.saliency import compute_scores
from nirvana.scores import load_scores, mean_scores, save_scores
from nirvana.sources.activations import merge_statistics

METHODS = ("nirvana", "nirvana-paper", "nirvana-uniform", "taylor", "flap", "wanda-sp", "magnitude", "random")
# The benchmark's rows that are not a --method of their own, as the `nirvana prune --method nirvana` flags that
# make them: the published recipe (layer 0 not kept whole), and NIRVANA's scores allocated uniformly.
ROW_FLAGS = {"nirvana-paper": {"recipe": "paper"}, "nirvana-uniform": {"allocation": "uniform"}}
RECOVER_METHODS = ("nirvana", "flap", "taylor")
GAMMA_SWEEP = (1.0, 2.0, 3.0, 4.0)
DEFAULT_GAMMA = 3.0
# Every run recorded before rows had their method's own calibration window length was at this length; a key
# names its length only when it is another, so those records keep their keys.
BASE_SEQ_LEN = 128


STUDIES = ("methods", "select", "gamma", "variance")
TAG_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row kind of the variance study: what it changes from NIRVANA's published settings (the defaults).

    Scoring: ``num_samples`` windows of ``seq_len`` tokens per calibration draw, ``micro_batch_size``,
    ``saliency``/``adam_steps`` (``nirvana prune``'s flags of those names). Choice: ``gamma`` (a number, or
    "auto": the KL pick from ``selection.GAMMA_GRID``), ``select`` (the lowest held-out-KL set of that many
    draws, ``--select-calib``), ``draws`` (the mean of that many draws' scores, ``nirvana.scores.mean_scores``),
    ``compensate`` (``--compensate bias``) and the allocation rules (``--protect-layers``, ``--min-kv-groups``,
    ``--normalize``).
    """

    num_samples: int = 32
    seq_len: int = 128
    micro_batch_size: int = 8
    saliency: str = "taylor"
    adam_steps: int = 0
    window_weight: str = "none"
    trim: float = 0.0
    gamma: float | str = DEFAULT_GAMMA
    select: int = 1
    draws: int = 1
    compensate: bool = False
    protect_layers: int = 0
    min_kv_groups: int = 0
    normalize: str = "none"

    def scoring(self) -> tuple:
        """What changes one calibration draw's scores: the cache key (with the seed)."""
        return (
            self.num_samples, self.seq_len, self.micro_batch_size, self.saliency, self.adam_steps,
            self.window_weight, self.trim,
        )  # fmt: skip

    def options(self) -> dict:
        """The NIRVANA method's settings (``nirvana.methods``) these scores take."""
        return {
            "objective": "maxlogit", "saliency": self.saliency, "adam_steps": self.adam_steps,
            "window_weight": self.window_weight, "trim": self.trim,
        }  # fmt: skip

    def rules(self) -> dict:
        return {"protect_layers": self.protect_layers, "min_kv_groups": self.min_kv_groups, "normalize": self.normalize}

    @property
    def num_draws(self) -> int:
        return max(self.select, self.draws)


# The variance study's variants, cheap ones first (the default order of --variants). "paper" is the published
# recipe: 32 windows x 128 tokens, gamma 3, no normalisation, one calibration set.
VARIANTS = {
    "paper": Variant(),
    "protect-1": Variant(protect_layers=1),
    "protect-2": Variant(protect_layers=2),
    "floor-2": Variant(min_kv_groups=2),
    "norm-mean": Variant(normalize="mean"),
    "norm-median": Variant(normalize="median"),
    "gamma-6": Variant(gamma=6.0),
    "compensate": Variant(compensate=True),
    "gamma-auto": Variant(gamma="auto"),
    "select-3": Variant(select=3),
    "draws-4": Variant(draws=4),
    "windows-64": Variant(num_samples=64),
    "adam": Variant(saliency="adam", micro_batch_size=1),
    "adam-steps-4": Variant(saliency="adam", adam_steps=4),
    "windows-128": Variant(num_samples=128),
    "select-8": Variant(select=8),
    "draws-8": Variant(draws=8),
    "windows-32x512": Variant(seq_len=512),
    "windows-256": Variant(num_samples=256),
    # Robust aggregation over windows (one window per backward pass): each window's gradient divided by its
    # norm or by its objective value before the sum; the 10% of windows with the largest gradient norms left out.
    "wnorm-norm": Variant(window_weight="norm", micro_batch_size=1),
    "wnorm-objective": Variant(window_weight="objective", micro_batch_size=1),
    "trim-10": Variant(trim=0.1, micro_batch_size=1),
    # Combinations with the first layer protected (the study's best single change at 20%, 30% and 40%), and Adam
    # with per-layer normalisation (its scores are |W*G| / sqrt(V), whose scale differs by layer).
    "protect-1+gamma-6": Variant(protect_layers=1, gamma=6.0),
    "protect-1+draws-4": Variant(protect_layers=1, draws=4),
    "protect-1+draws-8": Variant(protect_layers=1, draws=8),
    "protect-1+gamma-6+draws-4": Variant(protect_layers=1, gamma=6.0, draws=4),
    "protect-1+gamma-6+draws-8": Variant(protect_layers=1, gamma=6.0, draws=8),
    "protect-1+select-3": Variant(protect_layers=1, select=3),
    "protect-1+windows-64": Variant(protect_layers=1, num_samples=64),
    "protect-1+windows-128": Variant(protect_layers=1, num_samples=128),
    "protect-1+windows-256": Variant(protect_layers=1, num_samples=256),
    "protect-1+windows-32x512": Variant(protect_layers=1, seq_len=512),
    "protect-1+gamma-6+windows-32x512": Variant(protect_layers=1, gamma=6.0, seq_len=512),
    # The two that lower the spread most (4 draws, 512-token windows) together; both rows share their draws.
    "protect-1+windows-32x512+draws-4": Variant(protect_layers=1, seq_len=512, draws=4),
    "protect-1+gamma-6+windows-32x512+draws-4": Variant(protect_layers=1, gamma=6.0, seq_len=512, draws=4),
    "adam-norm-mean": Variant(saliency="adam", micro_batch_size=1, normalize="mean"),
    "adam+protect-1": Variant(saliency="adam", micro_batch_size=1, protect_layers=1),
    "protect-1+compensate": Variant(protect_layers=1, compensate=True),
    "protect-1+gamma-6+compensate": Variant(protect_layers=1, gamma=6.0, compensate=True),
    "protect-1+gamma-6+compensate+draws-4": Variant(protect_layers=1, gamma=6.0, compensate=True, draws=4),
}


def draw_seeds(variant: Variant, seed: int, num_seeds: int) -> list[int]:
    """The calibration seeds a variant's row ``seed`` scores: ``seed``, then ``seed + S``, ``seed + 2S``, ...

    ``S`` is the number of variance seeds, so the draws of different rows never share a seed, and every
    variant's first draw is the paper row's own calibration set."""
    return [seed + k * num_seeds for k in range(variant.num_draws)]


def pruned_units(plan) -> dict:
    """What a plan prunes, for the between-seed overlap: KV groups as [[row, group], ...] (attention rows as
    in ``Geometry``), MLP channel counts per layer, and the pruned-channel mask as zlib-compressed packed bits
    in base64 (row-major [num_layers, intermediate_size]; a few kB where the index list would be ~100 kB)."""
    g = plan.geometry
    kv, rows = [], [lp.kv_groups_kept for lp in plan.layers]
    rows += [lp.cross_kv_groups_kept for lp in plan.layers if lp.cross_kv_groups_kept is not None]
    for r, kept in enumerate(rows):
        kv += [[r, j] for j in sorted(set(range(g.num_kv_heads)) - set(kept))]
    mask = torch.ones(g.num_layers, g.intermediate_size, dtype=torch.bool)
    for i, lp in enumerate(plan.layers):
        mask[i, lp.mlp_channels_kept] = False
    bits = zlib.compress(_pack_bits(mask.flatten()), 9)
    return {
        "pruned_kv": kv,
        "pruned_mlp_counts": mask.sum(dim=1).tolist(),
        "pruned_mlp_bits": base64.b64encode(bits).decode("ascii"),
    }


def _pack_bits(flat: torch.Tensor) -> bytes:
    pad = (-flat.numel()) % 8
    padded = torch.cat([flat.to(torch.uint8), torch.zeros(pad, dtype=torch.uint8)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return bytes((padded * weights).sum(dim=1, dtype=torch.uint8).tolist())


def pruned_mlp_set(record: dict) -> set[int]:
    """The flat indices (layer * intermediate_size + channel) of the MLP channels a variance run pruned."""
    data = zlib.decompress(base64.b64decode(record["pruned_mlp_bits"]))
    return {8 * i + b for i, byte in enumerate(data) for b in range(8) if byte & (128 >> b)}


def jaccard(sets: list[set]) -> float | None:
    """Mean pairwise Jaccard index |A & B| / |A | B| over the sets (two empty sets agree: 1); None for < 2 sets."""
    pairs = list(itertools.combinations(sets, 2))
    if not pairs:
        return None
    return statistics.fmean(len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs)


def row_settings(method: str, override: str | None = None) -> PruneSettings:
    """The ``nirvana prune`` settings a methods-table row prunes with: ``--method BASE`` with the row's flags
    (:data:`ROW_FLAGS`), and ``--allocation override`` if given; a ValueError, one line, for a row whose
    recipe fixes another allocation."""
    base = "nirvana" if method.startswith("nirvana") else method
    flags = dict(ROW_FLAGS.get(method, {}))
    if override is not None:
        flags["allocation"] = override
    return PruneSettings.for_recipe(flags.pop("recipe", None), method=base, **flags)


def allocation_of(method: str, override: str | None = None) -> str:
    """The allocation a row prunes with: what :func:`row_settings` resolves to (the method's own by default)."""
    return row_settings(method, override).resolved_allocation


def row_rules(method: str, geometry, override: str | None = None) -> dict:
    """The allocation rules a row prunes with, resolved for the model as ``nirvana prune`` resolves them
    (``nirvana``: layer 0 kept whole under global allocation; ``nirvana-paper``: none)."""
    return row_settings(method, override).for_geometry(geometry).rules


def cache_meta(args) -> dict:
    """What every ``--scores-cache`` file this run reads must have been made with (beyond its name's method,
    window length and seed)."""
    return {"model": args.model, "calib": args.calib, "num_samples": args.num_samples}


def check_scores_cache(args) -> None:
    """A one-line ValueError, before the model loads, for a file in ``--scores-cache`` that this run would
    read (its name's window count is this run's) but that was made with another model or calibration text."""
    folder = getattr(args, "scores_cache", None)
    if folder is None or not Path(folder).is_dir():
        return
    for file in sorted(Path(folder).glob(f"*-{args.num_samples}x*-seed*.safetensors")):
        read_cached(file, cache_meta(args))


def read_cached(file: Path, want: dict):
    """The Scores in a ``--scores-cache`` file, which must have been made with every setting in ``want``
    (a one-line ValueError naming the file otherwise)."""
    scores = load_scores(file)
    made = scores.meta.get("bench") or {}
    if {k: made.get(k) for k in want} != want:
        raise ValueError(f"--scores-cache: {file} was made with {made!r}, not {want!r}")
    return scores


def identity(rules: dict | None = None, seq_len: int = BASE_SEQ_LEN, draws: int = 1) -> dict:
    """How a row scores and allocates beyond its method, seed, sparsity and gamma, as its records store it:
    its allocation rules, calibration window length and calibration draws per candidate. A record without
    one of them was made before records had it, with the published value (no rules, :data:`BASE_SEQ_LEN`,
    one draw)."""
    return {"rules": dict(rules or {}), "seq_len": seq_len, "draws": draws}


def record_identity(record: dict) -> dict:
    """The :func:`identity` a record was made with."""
    return identity(record.get("rules"), record.get("seq_len", BASE_SEQ_LEN), record.get("draws", 1))


def _suffix(ident: dict | None) -> str:
    """The part of a key that names an identity: only what differs from the published one, so that records
    made before a field existed keep their keys."""
    ident = ident or identity()
    rules = "".join(f"|{k}={v}" for k, v in ident["rules"].items() if v not in (0, "none"))
    window = "" if ident["seq_len"] == BASE_SEQ_LEN else f"|seq_len={ident['seq_len']}"
    draws = "" if ident["draws"] == 1 else f"|draws={ident['draws']}"
    return rules + window + draws


def pruned_key(method: str, seed: int, sparsity: float, gamma: float, ident: dict | None = None) -> str:
    """A methods-table run's key; its :func:`identity` is part of it where it is not the published one, so
    that a run of other rules, windows or draws is never read as this one's."""
    return f"{method}|seed={seed}|s={sparsity}|gamma={gamma}{_suffix(ident)}"


def same_identity(record: dict, ident: dict) -> bool:
    """Whether ``record`` was made with the identity ``ident`` (:func:`identity`)."""
    return _suffix(record_identity(record)) == _suffix(ident)


def current_results(results: dict, identities: dict[str, dict]) -> dict:
    """``results`` with only the methods-table, selection, gamma and recovery runs made with the identity
    each row has now (``identities``: method -> :func:`identity`; the select and gamma-auto studies are
    NIRVANA's). A file resumed across a change of a row's defaults keeps its older runs, but its tables show
    only the row's own."""

    def current(record: dict) -> bool:
        method = "nirvana" if record.get("study") in ("select", "gamma-auto") else record.get("method")
        return method not in identities or same_identity(record, identities[method])

    return results | {"runs": {k: r for k, r in results["runs"].items() if current(r)}}


def eval_text(name: str) -> str:
    named = corpus.eval_text(name)
    if named is not None:
        return named
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"--eval: {name!r} is not a file or one of {corpus.EVAL_TEXTS}")
    return path.read_text(encoding="utf-8")


def evaluate(model, windows: torch.Tensor, dense_logits: torch.Tensor | None = None) -> dict:
    """Perplexity over ``windows`` (one forward per window) and, given the dense logits, the token-mean KL."""
    nll, kl, count = 0.0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for i, window in enumerate(windows):
            logits = model(input_ids=window[None]).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
            count += window.numel() - 1
            if dense_logits is not None:
                # Windows are equally long, so the token mean is the mean of the per-window means.
                kl += kl_divergence(dense_logits[i].float(), logits)
    out = {"ppl": math.exp(nll / count)}
    if dense_logits is not None:
        out["kl"] = kl / windows.shape[0]
    return out


class Bench:
    """The loaded dense model, the evaluation windows, and the results file (resumable)."""

    def __init__(self, args):
        self.args = args
        label = Path(args.model).name if os.sep in args.model else args.model
        tag = getattr(args, "tag", None)
        self.json_path = Path(args.out) / (f"quality-{label}-{tag}.json" if tag else f"quality-{label}.json")
        self.results = self._load_results()  # before the model loads: a refusal costs nothing
        self.model, self.tokenizer = load_model(args.model, device="cpu")
        self.model.eval()
        self.geometry = get_adapter(self.model).geometry(self.model.config)
        self.architecture = (getattr(self.model.config, "architectures", None) or [type(self.model).__name__])[0]
        self.windows = {}
        for name in args.eval:
            ids = calibration.tokenize(eval_text(name), self.tokenizer)
            w = text_windows(ids, args.seq_len, args.windows)
            if w.shape[0] < args.windows:
                raise ValueError(f"--eval: {name!r} has only {w.shape[0]} windows of {args.seq_len} tokens")
            self.windows[Path(name).stem] = w
        self.kl_text = next(iter(self.windows))
        self._dense_logits = None
        self._scores: dict = {}

    def _settings(self) -> dict:
        a = self.args
        return {
            "model": a.model,
            "calib": a.calib,
            "eval": [Path(name).stem for name in a.eval],
            "windows": a.windows,
            "seq_len": a.seq_len,
            "num_samples": a.num_samples,
            "calib_seq_len": a.calib_seq_len,
            "heldout_samples": a.heldout_samples,
        }

    def _load_results(self) -> dict:
        """The results file's runs when its settings are these; a ValueError when they are not, since starting
        afresh would throw away what is there (hours of runs)."""
        if self.json_path.is_file():
            data = upgraded(json.loads(self.json_path.read_text()), self.args.calib_seq_len)
            if data.get("settings") == self._settings():
                return data
            theirs = data.get("settings") or {}
            ours = self._settings()
            diff = ", ".join(f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in ours if theirs.get(k) != ours.get(k))
            raise ValueError(
                f"{self.json_path}: holds results made with other settings ({diff}); pass another --tag "
                "or delete that file"
            )
        return {"settings": self._settings(), "runs": {}}

    def save(self) -> None:
        self.results["environment"] = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
        }
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        os.replace(tmp, self.json_path)

    @property
    def dense_logits(self) -> torch.Tensor:
        if self._dense_logits is None:
            with torch.no_grad():
                self._dense_logits = torch.stack(
                    [self.model(input_ids=w[None]).logits[0].to(torch.bfloat16) for w in self.windows[self.kl_text]]
                )
        return self._dense_logits

    def evaluate(self, model) -> dict:
        out = {}
        for name, windows in self.windows.items():
            r = evaluate(model, windows, self.dense_logits if name == self.kl_text else None)
            out[f"ppl_{name}"] = r["ppl"]
            if "kl" in r:
                out[f"kl_{name}"] = r["kl"]
        return out

    def seq_len(self, method: str) -> int:
        """The calibration window length a row scores with: ``--calib-seq-len``, else what ``nirvana prune``
        uses for the row's settings (NIRVANA's 512, 128 for ``nirvana-paper`` and the baselines)."""
        return self.prune_settings(method).seq_len

    def prune_settings(self, method: str, seed: int = 0) -> PruneSettings:
        """The ``nirvana prune --seed seed`` settings of a row, resolved for this model, with
        ``--calib-seq-len`` for its window length when given."""
        settings = row_settings(method, self.args.allocation)
        if self.args.calib_seq_len:
            settings = dataclasses.replace(settings, seq_len=self.args.calib_seq_len)
        return dataclasses.replace(settings, seed=seed).for_geometry(self.geometry)

    def draws(self, method: str) -> int:
        """The calibration draws a row averages (NIRVANA's 4, 1 for ``nirvana-paper`` and the baselines)."""
        return self.prune_settings(method).draws

    def identity(self, method: str) -> dict:
        """The row's :func:`identity`: its rules, window length and draws, as ``nirvana prune`` resolves them."""
        settings = self.prune_settings(method)
        return identity(settings.rules, settings.seq_len, settings.draws)

    def calibration(self, method: str, seed: int) -> torch.Tensor:
        return calibration.calibration_windows(
            self.args.calib,
            self.tokenizer,
            num_samples=self.args.num_samples,
            seq_len=self.seq_len(method),
            seed=seed,
        )

    def scores(self, method: str, seed: int):
        """(Scores, FLAP statistics or None, seconds) of a row pruned with ``--seed seed``: the mean of its
        draws' scores (:meth:`PruneSettings.candidate_seeds`; FLAP's statistics pooled), and the seconds
        they took together; each draw computed once per process, or read from ``--scores-cache``."""
        drawn = [self.draw_scores(method, d) for d in self.prune_settings(method, seed).candidate_seeds()[0]]
        seconds = sum(t for _, _, t in drawn)
        if len(drawn) == 1:
            return drawn[0][0], drawn[0][1], seconds
        stats = None if drawn[0][1] is None else merge_statistics([st for _, st, _ in drawn])
        return mean_scores([sc for sc, _, _ in drawn]), stats, seconds

    def draw_scores(self, method: str, seed: int):
        """(Scores, FLAP statistics or None, seconds) of one calibration draw of a row's method."""
        base = "nirvana" if method.startswith("nirvana") else method
        seq_len = self.seq_len(method)
        key = (base, seq_len, seed)
        if key not in self._scores:
            self._scores[key] = self._cached(base, seq_len, seed) or self._score(method, base, seed)
            self._cache(base, seq_len, seed, *self._scores[key])
        return self._scores[key]

    def _score(self, method: str, base: str, seed: int):
        start = time.perf_counter()
        stats = None
        windows = None if base in baselines.DATA_FREE else self.calibration(method, seed)
        if base == "nirvana":
            mbs = self.prune_settings(method).micro_batch_size
            scores = compute_scores(
                self.model, windows, objective="maxlogit", saliency="taylor", micro_batch_size=mbs, progress=False
            )
        elif base == "flap":
            stats = baselines.activation_statistics(self.model, windows, progress=False)
            scores = baselines.flap_scores(self.model, stats)
        else:
            scores = baselines.method_scores(self.model, windows, base, seed=seed, progress=False)
        return scores, stats, time.perf_counter() - start

    def _cache_file(self, base: str, seq_len: int, seed: int) -> Path | None:
        folder = getattr(self.args, "scores_cache", None)
        name = f"{base}-{self.args.num_samples}x{seq_len}-seed{seed}.safetensors"
        return None if folder is None else Path(folder) / name

    def _cache_meta(self, base: str, seq_len: int, seed: int) -> dict:
        return cache_meta(self.args) | {"method": base, "seq_len": seq_len, "seed": seed}

    def _cached(self, base: str, seq_len: int, seed: int):
        """A draw's scores from ``--scores-cache`` (scores only: FLAP's statistics are not kept), or None; a
        ValueError for a file made with other settings under the same name."""
        file = self._cache_file(base, seq_len, seed)
        if file is None or base == "flap" or not file.is_file():
            return None
        scores = read_cached(file, self._cache_meta(base, seq_len, seed))
        return scores, None, float(scores.meta["seconds"])

    def _cache(self, base: str, seq_len: int, seed: int, scores, stats, seconds: float) -> None:
        file = self._cache_file(base, seq_len, seed)
        if file is None or stats is not None or file.is_file():
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(scores.meta, bench=self._cache_meta(base, seq_len, seed), seconds=seconds)
        tmp = file.with_name(file.name + ".tmp")
        save_scores(dataclasses.replace(scores, meta=meta), tmp)
        os.replace(tmp, file)

    def rules(self, method: str) -> dict:
        return self.prune_settings(method).rules

    def plan(self, method: str, seed: int, sparsity: float, gamma: float = DEFAULT_GAMMA):
        scores = self.scores(method, seed)[0]
        return allocate(
            scores.attention,
            scores.mlp,
            self.geometry,
            sparsity=sparsity,
            gamma=gamma,
            allocation=allocation_of(method, self.args.allocation),
            architecture=self.architecture,
            **self.rules(method),
        )

    def prepare(self, method: str, seed: int, plan):
        stats = self.scores(method, seed)[1]
        if method != "flap":
            return None
        return lambda m: baselines.apply_flap_compensation(m, plan, stats)

    def run(self, key: str, build) -> dict:
        """Record ``build()``'s figures under ``key`` unless a previous run did; returns them."""
        if key in self.results["runs"]:
            return self.results["runs"][key]
        start = time.perf_counter()
        record = build()
        record["seconds"] = round(time.perf_counter() - start, 1)
        self.results["runs"][key] = record
        self.save()
        figures = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
        print(f"{key}: {figures}", flush=True)
        return record

    def pruned(self, method: str, seed: int, sparsity: float, gamma: float = DEFAULT_GAMMA) -> dict:
        def build():
            plan = self.plan(method, seed, sparsity, gamma)
            model = selection.pruned_copy(self.model, plan, self.prepare(method, seed, plan))
            record = self.evaluate(model)
            record.update(
                method=method,
                seed=seed,
                sparsity=sparsity,
                gamma=gamma,
                allocation=plan.meta["allocation"],
                achieved_sparsity=plan.achieved_sparsity(),
                params=count_params(model),
                scoring_seconds=round(self.scores(method, seed)[2], 1),
                **self.identity(method),
            )
            return record

        return self.run(pruned_key(method, seed, sparsity, gamma, self.identity(method)), build)

    def dense(self) -> dict:
        def build():
            record = self.evaluate(self.model)
            record.update(method="dense", params=count_params(self.model), achieved_sparsity=0.0)
            return record

        return self.run("dense", build)

    def heldout(self) -> torch.Tensor:
        """NIRVANA's held-out KL windows, as long as its calibration windows (as ``nirvana prune`` draws them)."""
        return calibration.heldout_windows(
            self.args.calib,
            self.tokenizer,
            num_samples=self.args.heldout_samples,
            seq_len=self.seq_len("nirvana"),
            seed=0,
        )

    def select_study(self, sparsity: float, seeds: list[int]) -> dict:
        """KL selection among the NIRVANA calibration sets of ``seeds`` at ``sparsity`` (keyed by their number:
        a run with more seeds selects afresh rather than reusing a pick among fewer, and by the default's rules
        and window length: a pick made with others is not this one's); then that set's run."""
        ident = self.identity("nirvana")
        rules = ident["rules"]

        def build():
            candidates = [selection.Candidate(s, self.scores("nirvana", s)[0]) for s in seeds]
            chosen = selection.select(
                self.model, candidates, self.heldout(), sparsity=sparsity, gammas=[DEFAULT_GAMMA],
                allocation=allocation_of("nirvana", self.args.allocation), architecture=self.architecture,
                rules=rules,
            )  # fmt: skip
            return {"study": "select", "sparsity": sparsity, "seed": chosen.seed, "trials": chosen.trials, **ident}

        legacy = self.results["runs"].get(f"select|s={sparsity}")  # before the key had the seed count
        if legacy is not None and selection_seeds(legacy) == list(seeds) and same_identity(legacy, ident):
            record = legacy
        else:
            record = self.run(select_key(sparsity, len(seeds), ident), build)
        return self.pruned("nirvana", record["seed"], sparsity) | {"selected_seed": record["seed"]}

    def gamma_auto(self, sparsity: float) -> dict:
        ident = self.identity("nirvana")
        rules = ident["rules"]

        def build():
            candidates = [selection.Candidate(0, self.scores("nirvana", 0)[0])]
            chosen = selection.select(
                self.model, candidates, self.heldout(), sparsity=sparsity, gammas=list(selection.GAMMA_GRID),
                allocation=allocation_of("nirvana", self.args.allocation), architecture=self.architecture,
                rules=rules,
            )  # fmt: skip
            record = {"study": "gamma-auto", "sparsity": sparsity, "gamma": chosen.gamma, "trials": chosen.trials}
            return record | ident

        record = self.run(gamma_auto_key(sparsity, ident), build)
        return self.pruned("nirvana", 0, sparsity, record["gamma"])

    def variant_scores(self, variant: Variant, seed: int):
        """(Scores, activation statistics or None, seconds) of one calibration draw of ``variant``; computed once
        per process for every variant that scores alike (paper, protect, floor, norm, gamma and compensate rows
        share them). The statistics (``compensate`` only) come from the same windows; their time is added."""
        windows = None
        key = ("variance", *variant.scoring(), seed)
        if key not in self._scores:
            start = time.perf_counter()
            windows = self.variant_windows(variant, seed)
            scores = get_method("nirvana").scores(
                self.model, windows, micro_batch_size=variant.micro_batch_size, seed=seed, progress=False,
                **variant.options(),
            )  # fmt: skip
            scores.meta["calibration_seed"] = seed
            self._scores[key] = (scores, None, time.perf_counter() - start)
        scores, _, seconds = self._scores[key]
        if not variant.compensate:
            return scores, None, seconds
        stats_key = ("variance-statistics", variant.num_samples, variant.seq_len, seed)
        if stats_key not in self._scores:
            start = time.perf_counter()
            windows = self.variant_windows(variant, seed) if windows is None else windows
            stats = baselines.activation_statistics(
                self.model, windows, micro_batch_size=variant.micro_batch_size, progress=False
            )
            self._scores[stats_key] = (None, stats, time.perf_counter() - start)
        _, stats, stats_seconds = self._scores[stats_key]
        return scores, stats, seconds + stats_seconds

    def variant_windows(self, variant: Variant, seed: int) -> torch.Tensor:
        return calibration.calibration_windows(
            self.args.calib, self.tokenizer, num_samples=variant.num_samples, seq_len=variant.seq_len, seed=seed
        )

    def variance(self, name: str, seed: int, sparsity: float) -> dict:
        """One variance-study row: variant ``name`` (:data:`VARIANTS`) with row seed ``seed`` at ``sparsity``."""
        variant = VARIANTS[name]

        def build():
            seeds = draw_seeds(variant, seed, self.args.variance_seeds)
            drawn = [self.variant_scores(variant, d) for d in seeds]
            scoring = sum(t for _, _, t in drawn)
            stats = {d: st for d, (_, st, _) in zip(seeds, drawn)}
            bias = compensation.compensation_for(get_method("nirvana"), "bias") if variant.compensate else None
            if variant.draws > 1:
                candidates = [selection.Candidate(seed, mean_scores([sc for sc, _, _ in drawn]))]
                if variant.compensate:  # as `nirvana prune --draws`: the biases from all the draws' windows
                    stats = {seed: merge_statistics([st for _, st, _ in drawn])}
            else:
                candidates = [selection.Candidate(d, sc) for d, (sc, _, _) in zip(seeds, drawn)]
            gammas = list(selection.GAMMA_GRID) if variant.gamma == "auto" else [float(variant.gamma)]
            allocation = allocation_of("nirvana", self.args.allocation)
            chosen_seed, trials = candidates[0].seed, []
            if len(candidates) > 1 or len(gammas) > 1:
                chosen = selection.select(
                    self.model, candidates, self.heldout(), sparsity=sparsity, gammas=gammas, allocation=allocation,
                    architecture=self.architecture, rules=variant.rules(),
                    prepare=None if bias is None else (lambda m, plan, c: bias(m, plan, stats[c.seed])),
                )  # fmt: skip
                plan, gamma, chosen_seed, trials = chosen.plan, chosen.gamma, chosen.seed, chosen.trials
            else:
                gamma = gammas[0]
                scores = candidates[0].scores
                plan = allocate(
                    scores.attention, scores.mlp, self.geometry, sparsity=sparsity, gamma=gamma,
                    allocation=allocation, architecture=self.architecture, **variant.rules(),
                )  # fmt: skip
            used = next(c for c in candidates if c.seed == chosen_seed).scores.attention
            hook = None if bias is None else (lambda m: bias(m, plan, stats[chosen_seed]))
            model = selection.pruned_copy(self.model, plan, hook)
            eval_start = time.perf_counter()
            record = self.evaluate(model)
            record.update(
                study="variance", variant=name, seed=seed, sparsity=sparsity, gamma=gamma, allocation=allocation,
                draw_seeds=seeds, chosen_seed=chosen_seed, draws_scored=len(seeds),
                scoring_seconds=round(scoring, 2), eval_seconds=round(time.perf_counter() - eval_start, 2),
                achieved_sparsity=plan.achieved_sparsity(), params=count_params(model),
                trials=[{k: t[k] for k in ("seed", "gamma", "kl") if k in t} for t in trials],
                kv_scores=[[float(f"{x:.5g}") for x in row] for row in used.tolist()],
                **pruned_units(plan),
            )  # fmt: skip
            return record

        return self.run(variance_key(name, seed, sparsity), build)

    def recovered(self, method: str, seed: int, sparsity: float, steps: int) -> dict:
        """``method`` pruned from calibration seed ``seed`` at ``sparsity`` (FLAP with its compensation biases),
        saved, fine-tuned for ``steps`` LoRA steps by ``nirvana finetune`` (its windows and adapters seeded with
        ``seed``), loaded back and evaluated. The methods-table run of the same pruning is recorded first: it is
        the recovery table's "before"."""
        self.pruned(method, seed, sparsity)
        ident = self.identity(method)
        legacy = f"recover|{method}|s={sparsity}|steps={steps}"  # seed 0's key before recovery had seeds
        if seed == 0 and legacy in self.results["runs"] and not _suffix(ident):
            return self.results["runs"][legacy]

        def build():
            from nirvana.checkpoint import load_pruned, save_pruned
            from nirvana.finetune import finetune

            plan = self.plan(method, seed, sparsity)
            model = selection.pruned_copy(self.model, plan, self.prepare(method, seed, plan))
            with tempfile.TemporaryDirectory() as tmp:
                save_pruned(model, self.tokenizer, plan, Path(tmp) / "pruned")
                del model
                summary = finetune(
                    Path(tmp) / "pruned", self.args.calib, steps=steps, out=Path(tmp) / "tuned", seed=seed,
                    progress=False,
                )  # fmt: skip
                tuned = load_pruned(Path(tmp) / "tuned")
            record = self.evaluate(tuned)
            record.update(
                method=method, seed=seed, sparsity=sparsity, steps=steps, params=count_params(tuned), **ident
            )  # fmt: skip
            record["finetune"] = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
            return record

        return self.run(recover_key(method, seed, sparsity, steps, ident), build)


def recover_key(method: str, seed: int, sparsity: float, steps: int, ident: dict | None = None) -> str:
    return f"recover|{method}|seed={seed}|s={sparsity}|steps={steps}{_suffix(ident)}"


def recover_runs(results: dict) -> dict[tuple, dict[int, dict]]:
    """(method, sparsity, steps) -> {seed: recovery record}. A key without a seed (written before recovery had
    seeds) is seed 0's, unless a key with ``seed=0`` holds the same run too."""
    out: dict[tuple, dict[int, dict]] = {}
    for key, r in sorted(results["runs"].items(), key=lambda kv: "|seed=" in kv[0]):  # seedless keys first
        if key.startswith("recover|"):
            seed = r.get("seed", 0) if "|seed=" in key else 0
            out.setdefault((r["method"], r["sparsity"], r["steps"]), {})[seed] = r
    return out


def select_key(sparsity: float, num_seeds: int, ident: dict | None = None) -> str:
    """A KL-selection study's key: its seed count and, as in :func:`pruned_key`, its identity."""
    return f"select|s={sparsity}|seeds={num_seeds}{_suffix(ident)}"


def gamma_auto_key(sparsity: float, ident: dict | None = None) -> str:
    return f"gamma-auto|s={sparsity}{_suffix(ident)}"


def selection_seeds(record: dict) -> list[int]:
    """The calibration seeds a ``select`` record chose among, from its trials."""
    return sorted({t["seed"] for t in record["trials"]})


def selections(results: dict) -> dict[float, dict]:
    """sparsity -> the ``select`` record that chose among the most calibration seeds."""
    out: dict[float, dict] = {}
    for key, r in results["runs"].items():
        if key.startswith("select|"):
            have = out.get(r["sparsity"])
            if have is None or len(selection_seeds(r)) > len(selection_seeds(have)):
                out[r["sparsity"]] = r
    return out


def variance_key(name: str, seed: int, sparsity: float) -> str:
    return f"variance|{name}|seed={seed}|s={sparsity}"


# --------------------------------------------------------------------------------------------------
# Tables and plot
# --------------------------------------------------------------------------------------------------


def _mean_std(values: list[float], digits: int = 2) -> str:
    """``mean ± sample standard deviation`` (n - 1 in the denominator); the value alone for one run."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _runs(results: dict, **match) -> list[dict]:
    return [
        r
        for k, r in results["runs"].items()
        if "|" in k
        and not k.startswith(("select", "gamma-auto", "recover", "variance"))
        and all(r.get(f) == v for f, v in match.items())
    ]


def _window_lengths(results: dict) -> str:
    length = results["settings"].get("calib_seq_len")
    if length is not None:
        return f"{length} tokens each for every row"
    return (
        "each row as long as `nirvana prune` draws them for its method (NIRVANA's 512 tokens; `nirvana-paper` "
        f"and the baselines {BASE_SEQ_LEN})"
    )


def render(results: dict, methods, sparsities, texts: list[str], command: str, recover_seeds: int | None = None) -> str:
    """The methods study's markdown: per sparsity, each method's mean ± sample std over seeds; then the KL
    selection, the gamma sweep and the recovery tables (``recover_seeds``: the seeds asked for, see
    :func:`recover_table`)."""
    env = results.get("environment", {})
    dense = results["runs"].get("dense", {})
    kl_text = texts[0]
    lines = [
        f"# Quality: {results['settings']['model']} pruned by method and sparsity",
        "",
        f"Date {env.get('date', '?')}; {env.get('machine', '?')}. Command: `{command}`.",
        "",
        f"Settings: {json.dumps(results['settings'])}. Calibration windows are drawn from the calibration "
        f"text with each seed, {_window_lengths(results)}; evaluation texts are never used for any choice. "
        "Cells with ± are the mean "
        "± sample standard deviation (n - 1) over the calibration seeds (`seeds` counts them). Sparsity: "
        "achieved share of the attention+MLP linear parameters removed. Default gamma 3.",
        "",
        f"Dense: {dense.get('params', 0) / 1e6:.1f}M parameters, "
        + ", ".join(f"perplexity {dense.get(f'ppl_{t}', float('nan')):.2f} on {t}" for t in texts)
        + ".",
        "",
    ]
    for s in sparsities:
        if not any(_runs(results, method=m, sparsity=s, gamma=DEFAULT_GAMMA) for m in methods):
            continue  # a sparsity asked for but not run yet: no empty table
        lines += [
            f"## Sparsity {s:.0%}",
            "",
            "| method | allocation | seeds | achieved | params | "
            + " | ".join(f"ppl {t}" for t in texts)
            + f" | KL {kl_text} |",
            "|---|---|---|---|---|" + "---|" * (len(texts) + 1),
        ]
        for m in methods:
            runs = _runs(results, method=m, sparsity=s, gamma=DEFAULT_GAMMA)
            if not runs:
                continue
            ach = sorted({round(100 * r["achieved_sparsity"], 2) for r in runs})
            params = sorted({round(r["params"] / 1e6, 2) for r in runs})
            cells = [_mean_std([r[f"ppl_{t}"] for r in runs]) for t in texts]
            kl = _mean_std([r[f"kl_{kl_text}"] for r in runs])
            lines.append(
                f"| {m} | {runs[0]['allocation']} | {len(runs)} | {'/'.join(f'{a:.2f}%' for a in ach)} | "
                f"{'/'.join(f'{p:.2f}M' for p in params)} | " + " | ".join(cells) + f" | {kl} |"
            )
        lines.append("")
    select = selections(results)
    if select:
        lengths = "/".join(str(n) for n in sorted({r.get("seq_len", BASE_SEQ_LEN) for r in select.values()}))
        lines += [
            "## KL-selected calibration set against random calibration sets (NIRVANA)",
            "",
            "The selected set has the lowest KL(dense || pruned) on the calibration text's held-out tail "
            f"({results['settings']['heldout_samples']} windows of {lengths} tokens, as the calibration windows), "
            "among the seeds (`seeds` counts them); `random` is the mean ± sample standard deviation over the same "
            "seeds.",
            "",
            "| sparsity | seeds | selected seed | "
            + " | ".join(f"ppl {t} selected | ppl {t} random" for t in texts)
            + " |",
            "|---|---|---|" + "---|---|" * len(texts),
        ]
        for s, r in sorted(select.items()):
            runs = _runs(results, method="nirvana", sparsity=s, gamma=DEFAULT_GAMMA)
            among = selection_seeds(r) or sorted(x["seed"] for x in runs)  # no trials recorded: every seed's
            runs = [x for x in runs if x["seed"] in among]
            chosen = next((x for x in runs if x["seed"] == r["seed"]), None)
            if chosen is None:
                continue
            cells = " | ".join(f"{chosen[f'ppl_{t}']:.2f} | {_mean_std([x[f'ppl_{t}'] for x in runs])}" for t in texts)
            lines.append(f"| {s:.0%} | {len(among)} | {r['seed']} | {cells} |")
        lines.append("")
    gamma_runs = _runs(results, method="nirvana", seed=0)
    autos = {r["sparsity"]: r["gamma"] for k, r in results["runs"].items() if k.startswith("gamma-auto|")}
    if len({r["gamma"] for r in gamma_runs}) > 1:
        lines += [
            "## Gamma sweep (NIRVANA, seed 0)",
            "",
            "gamma = share of MLP channels pruned / share of KV groups pruned. `auto` picks from "
            f"{list(selection.GAMMA_GRID)} by the calibration-side KL; its pick is marked *.",
            "",
            "| sparsity | gamma | achieved | " + " | ".join(f"ppl {t}" for t in texts) + f" | KL {kl_text} |",
            "|---|---|---|" + "---|" * (len(texts) + 1),
        ]
        for r in sorted(gamma_runs, key=lambda r: (r["sparsity"], r["gamma"])):
            mark = " *" if autos.get(r["sparsity"]) == r["gamma"] else ""
            lines.append(
                f"| {r['sparsity']:.0%} | {r['gamma']:g}{mark} | {100 * r['achieved_sparsity']:.2f}% | "
                + " | ".join(f"{r[f'ppl_{t}']:.2f}" for t in texts)
                + f" | {r[f'kl_{kl_text}']:.4f} |"
            )
        lines.append("")
    lines += recover_table(results, methods, texts, recover_seeds)
    return "\n".join(lines)


def recover_table(results: dict, methods, texts: list[str], num_seeds: int | None = None) -> list[str]:
    """Markdown lines: per (method, sparsity, steps) recovered, the mean ± sample std over its seeds of the
    perplexity before fine-tuning (the methods-table runs of the same seeds) and after. Fewer seeds than
    ``num_seeds`` (None: the most any row has) is marked partial for a method of :data:`RECOVER_METHODS`."""
    groups = recover_runs(results)
    if not groups:
        return []
    asked = num_seeds or max(len(by_seed) for by_seed in groups.values())
    order = {m: i for i, m in enumerate(methods)}
    lines = [
        "## Recovery: LoRA fine-tuning on the calibration text",
        "",
        "Each method pruned from calibration seed s (before: its run in the tables above), then fine-tuned by "
        "`nirvana finetune` (LoRA) for `steps` steps on the calibration text, its windows and adapters seeded with "
        "s (after). Cells are mean ± sample standard deviation (n - 1) over the seeds; `seeds` counts them, "
        "`k of N (partial)` while only k of the N asked for have run.",
        "",
        "| method | sparsity | steps | seeds | params | "
        + " | ".join(f"ppl {t} before | ppl {t} after" for t in texts)
        + " |",
        "|---|---|---|---|---|" + "---|---|" * len(texts),
    ]
    for (method, sparsity, steps), by_seed in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0])
    ):
        seeds = sorted(by_seed)
        after = [by_seed[seed] for seed in seeds]
        before = [
            next(iter(_runs(results, method=method, seed=seed, sparsity=sparsity, gamma=DEFAULT_GAMMA)), {})
            for seed in seeds
        ]
        cells = " | ".join(
            _mean_std([b[f"ppl_{t}"] for b in before if f"ppl_{t}" in b])
            + " | "
            + _mean_std([r[f"ppl_{t}"] for r in after])
            for t in texts
        )
        # Only a method the run recovers can lack seeds; another (an earlier run's) shows what it has.
        partial = method in RECOVER_METHODS and len(seeds) < asked
        count = f"{len(seeds)} of {asked} (partial)" if partial else f"{len(seeds)}"
        params = "/".join(f"{p:.2f}M" for p in sorted({round(r["params"] / 1e6, 2) for r in after}))
        lines.append(f"| {method} | {sparsity:.0%} | {steps} | {count} | {params} | {cells} |")
    lines.append("")
    return lines


def variance_runs(results: dict, variant: str, sparsity: float | None = None) -> list[dict]:
    """A variant's variance-study runs (at ``sparsity``, if given), by seed."""
    runs = [
        r
        for k, r in results["runs"].items()
        if k.startswith("variance|") and r["variant"] == variant and (sparsity is None or r["sparsity"] == sparsity)
    ]
    return sorted(runs, key=lambda r: (r["sparsity"], r["seed"]))


def variance_cells(runs: list[dict], texts: list[str]) -> dict:
    """Per-seed figures of one (variant, sparsity): ppl per text, KL, overlaps, layer-0 KV groups pruned, cost."""
    return {
        "n": len(runs),
        "ppl": {t: [r[f"ppl_{t}"] for r in runs] for t in texts},
        "kl": [r[f"kl_{texts[0]}"] for r in runs],
        "overlap_kv": jaccard([{tuple(u) for u in r["pruned_kv"]} for r in runs]),
        # A committed results file may leave the masks out (its size); the overlap is then unknown.
        "overlap_mlp": jaccard([pruned_mlp_set(r) for r in runs])
        if all("pruned_mlp_bits" in r for r in runs)
        else None,
        "layer0_kv": [sum(1 for row, _ in r["pruned_kv"] if row == 0) for r in runs],
        "per_candidate_s": [r["scoring_seconds"] / r["draws_scored"] for r in runs],
        "achieved": [r["achieved_sparsity"] for r in runs],
    }


SPREAD_LIMIT = 5.0  # "spread within ±5": a seed std of at most this on every text and sparsity


def variance_summary(results: dict, variants, sparsities, texts: list[str], num_seeds: int) -> list[dict]:
    """Per variant: mean ppl over both texts and all sparsities (each cell a mean over seeds), the largest seed
    std of any (text, sparsity), whether every std is within :data:`SPREAD_LIMIT`, the scoring seconds per
    candidate, and whether every (sparsity) has all ``num_seeds`` seeds; sorted by mean ppl."""
    out = []
    for v in variants:
        cells = [variance_cells(variance_runs(results, v, s), texts) for s in sparsities]
        if not any(c["n"] for c in cells):
            continue
        means = [statistics.fmean(c["ppl"][t]) for c in cells if c["n"] for t in texts]
        stds = [statistics.stdev(c["ppl"][t]) for c in cells if c["n"] > 1 for t in texts]
        cost = [x for c in cells for x in c["per_candidate_s"]]
        out.append(
            {
                "variant": v,
                "mean_ppl": statistics.fmean(means),
                "max_std": max(stds) if stds else None,
                "within": bool(stds) and len(stds) == len(means) and max(stds) <= SPREAD_LIMIT,
                "per_candidate_s": statistics.fmean(cost),
                "complete": all(c["n"] >= num_seeds for c in cells),
                "counts": [c["n"] for c in cells],
            }
        )
    return sorted(out, key=lambda r: r["mean_ppl"])


def render_variance(results: dict, variants, sparsities, texts: list[str], num_seeds: int) -> str:
    """The variance study's tables: per sparsity, each variant's mean ± sample std over the seeds; then the
    summary ranking. A row with fewer than ``num_seeds`` seeds says n=k/S (partial)."""
    kl_text = texts[0]
    names = ", ".join(f"`{n}`" for n in VARIANTS)
    lines = [
        "## Variance study: NIRVANA variants over calibration seeds",
        "",
        f"Each variant runs with {num_seeds} calibration seeds; row seed s scores calibration seed s, and a "
        f"variant that needs K draws (`select-K`, `draws-K`) scores seeds s, s+{num_seeds}, s+{2 * num_seeds}, ... "
        "so no two rows share a draw and every variant's first draw is the `paper` row's own. Cells are mean ± "
        "sample standard deviation (n - 1) over the seeds. Overlap: mean pairwise Jaccard index, across seeds, "
        "of the pruned KV-group set and of the pruned MLP-channel set (1 = every seed prunes the same units). "
        "L0 KV: KV groups pruned in layer 0, per run. Scoring s/candidate: scoring time of the row's "
        "calibration draws divided by their number (an earlier row's draw reused in one process still counts "
        "with its own time). A row with n=k/S is partial: only k of the S seeds have run.",
        "",
        f"Variants: {names}.",
        "",
    ]
    for s in sparsities:
        lines += [
            f"### Variance study at sparsity {s:.0%}",
            "",
            "| variant | n | achieved | "
            + " | ".join(f"ppl {t}" for t in texts)
            + f" | KL {kl_text} | overlap KV | overlap MLP | L0 KV | scoring s/candidate |",
            "|---|---|---|" + "---|" * (len(texts) + 5),
        ]
        for v in variants:
            runs = variance_runs(results, v, s)
            if not runs:
                continue
            c = variance_cells(runs, texts)
            n = f"{c['n']}" if c["n"] >= num_seeds else f"n={c['n']}/{num_seeds} (partial)"
            overlap = ["-" if x is None else f"{x:.3f}" for x in (c["overlap_kv"], c["overlap_mlp"])]
            lines.append(
                f"| {v} | {n} | {100 * statistics.fmean(c['achieved']):.2f}% | "
                + " | ".join(_mean_std(c["ppl"][t]) for t in texts)
                + f" | {_mean_std(c['kl'], 4)} | {overlap[0]} | {overlap[1]} | {_mean_std(c['layer0_kv'], 1)} | "
                f"{_mean_std(c['per_candidate_s'], 1)} |"
            )
        lines.append("")
    lines += layer0_table(results, variants, sparsities)
    summary = variance_summary(results, variants, sparsities, texts, num_seeds)
    if summary:
        lines += [
            "### Variance study: variants ranked by mean perplexity",
            "",
            f"Mean perplexity over {' and '.join(texts)} and sparsities "
            f"{', '.join(f'{s:.0%}' for s in sparsities)} (each cell's mean over seeds, then the mean of the "
            f"cells); largest seed std: the largest sample std of any text and sparsity; spread within ±"
            f"{SPREAD_LIMIT:g}: that std is at most {SPREAD_LIMIT:g} everywhere. A partial variant lacks seeds "
            "or sparsities, so its figures may move.",
            "",
            "| rank | variant | mean ppl | largest seed std | spread within ±5 | scoring s/candidate | seeds |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(summary, 1):
            std = "-" if r["max_std"] is None else f"{r['max_std']:.2f}"
            seeds = "/".join(map(str, r["counts"]))
            seeds = seeds if r["complete"] else f"{seeds} of {num_seeds} (partial)"
            lines.append(
                f"| {i} | {r['variant']} | {r['mean_ppl']:.2f} | {std} | {'yes' if r['within'] else 'no'} | "
                f"{r['per_candidate_s']:.1f} | {seeds} |"
            )
        lines.append("")
    return "\n".join(lines)


def layer0_table(results: dict, variants, sparsities) -> list[str]:
    """Markdown lines: per variant, how layer 0's KV-group scores stand against the other layers' (the raw
    scores the allocation ranked, before any ``--normalize``), and in how many runs layer 0 lost a KV group."""
    rows = []
    for v in variants:
        runs = variance_runs(results, v)
        scored = {r["seed"]: r["kv_scores"] for r in runs if "kv_scores" in r}  # one per seed: sparsity aside
        ratios, early = [], []
        for kv in scored.values():
            means = [statistics.fmean(row) for row in kv]
            if len(means) > 4:
                ratios.append(means[0] / statistics.fmean(means[1:]))
                early.append(statistics.fmean(means[1:4]) / statistics.fmean(means[4:]))
        pruned = []
        for s in sparsities:
            at = variance_runs(results, v, s)
            hit = sum(1 for r in at if any(row == 0 for row, _ in r["pruned_kv"]))
            pruned.append(f"{hit}/{len(at)}" if at else "-")
        if runs:
            rows.append(
                f"| {v} | {len(scored)} | {_mean_std(ratios, 3)} | {_mean_std(early, 3)} | " + " | ".join(pruned) + " |"
            )
    if not rows:
        return []
    return [
        "### Layer 0's KV groups against the rest",
        "",
        "Score ratios from the KV-group scores each run's allocation ranked (the chosen calibration set's, or the "
        "mean of the draws; raw, before any normalisation), mean ± sample std over the seeds that recorded them: "
        "layer 0's mean group score over the other layers' mean, and layers 1-3's over layers 4 and up. Then, per "
        "sparsity, the runs that pruned at least one of layer 0's KV groups.",
        "",
        "| variant | seeds | layer 0 / rest | layers 1-3 / 4+ | "
        + " | ".join(f"L0 pruned at {s:.0%}" for s in sparsities)
        + " |",
        "|---|---|---|---|" + "---|" * len(sparsities),
        *rows,
        "",
    ]


def plot_variance(results: dict, variants, sparsities, texts: list[str], path: Path) -> Path:
    """One panel per text, one row per variant, ranked by mean perplexity (:func:`variance_summary`, the best
    at the top): the mean ± sample std over seeds at each sparsity, one colour per sparsity, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = variance_summary(results, variants, sparsities, texts, 1)
    ranked = [r["variant"] for r in summary]
    cells = {}  # (variant, sparsity, text) -> (mean, sample std) over seeds
    for v in ranked:
        for s in sparsities:
            for t in texts:
                vals = [r[f"ppl_{t}"] for r in variance_runs(results, v, s)]
                if vals:
                    cells[v, s, t] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    # The scale fits the variants within 2x the best mean; a worse one (Adam, per-layer normalisation) would
    # squeeze the rest into a sliver, so its points beyond the edge are drawn as ">" at the edge.
    near = {r["variant"] for r in summary if r["mean_ppl"] <= 2 * summary[0]["mean_ppl"]} if summary else set()
    cap = 1.5 * max((m + e for (v, _, _), (m, e) in cells.items() if v in near), default=float("inf"))
    height = 1.5 + 0.26 * len(ranked)
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), height), squeeze=False, sharey=True)
    dense = results["runs"].get("dense", {})
    offset = 0.6 / max(len(sparsities), 1)
    for ax, t in zip(axes[0], texts):
        for k, s in enumerate(sparsities):
            xs, err, rows = [], [], []
            for i, v in enumerate(ranked):
                if (v, s, t) in cells:
                    xs.append(cells[v, s, t][0])
                    err.append(cells[v, s, t][1])
                    rows.append(i + (k - (len(sparsities) - 1) / 2) * offset)
            inside = [i for i, x in enumerate(xs) if x <= cap]
            bar = ax.errorbar(
                [xs[i] for i in inside], [rows[i] for i in inside], xerr=[err[i] for i in inside], fmt="o",
                markersize=3, capsize=2, linewidth=0.8, label=f"{s:.0%}",
            )  # fmt: skip
            beyond = [rows[i] for i in range(len(xs)) if xs[i] > cap]
            if beyond:
                ax.plot([cap] * len(beyond), beyond, ">", markersize=4, color=bar[0].get_color(), clip_on=False)
        if f"ppl_{t}" in dense:
            ax.axvline(dense[f"ppl_{t}"], color="gray", linestyle=":", label="dense")
        ax.set_xscale("log")
        if math.isfinite(cap):
            ax.set_xlim(right=cap)
        # Plain numbers at 1, 2, 3 and 5 per decade: the default labels every minor tick, and they overlap.
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_yticks(range(len(ranked)), ranked, fontsize=7)
        ax.set_ylim(len(ranked) - 0.5, -0.5)  # the best variant at the top
        ax.set_xlabel(f"perplexity on {t} (log scale; > off scale)")
        ax.set_title(t)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=7, title="sparsity", title_fontsize=7, loc="lower right")
    fig.suptitle(
        f"{results['settings']['model']}: NIRVANA variants ranked by mean perplexity, mean ± sample std over seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _selected_runs(results: dict) -> dict[float, dict]:
    """sparsity -> the NIRVANA run of the calibration set KL selection picked (gamma 3)."""
    out = {}
    for s, r in selections(results).items():
        runs = _runs(results, method="nirvana", sparsity=s, gamma=DEFAULT_GAMMA, seed=r["seed"])
        if runs:
            out[s] = runs[0]
    return out


# A method whose perplexity passes this multiple of the dense one is drawn off the plot's scale, so the
# collapsed ones (magnitude, random) do not squash the methods worth comparing.
OFF_SCALE = 50


def plot(results: dict, methods, sparsities, texts: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(6.5 * len(texts), 5.2), squeeze=False)
    dense = results["runs"].get("dense", {})
    selected = _selected_runs(results)
    for ax, t in zip(axes[0], texts):
        base = dense.get(f"ppl_{t}", 1.0)
        top = base
        for m in methods:
            xs, ys, err = [], [], []
            for s in sparsities:
                vals = [r[f"ppl_{t}"] for r in _runs(results, method=m, sparsity=s, gamma=DEFAULT_GAMMA)]
                if vals:
                    xs.append(100 * s)
                    ys.append(statistics.fmean(vals))
                    err.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            if not xs:
                continue
            if min(ys) > OFF_SCALE * base:
                ax.plot([], [], " ", label=f"{m}: off scale ({min(ys):.2g} to {max(ys):.2g})")
                continue
            # Only the points on the scale are drawn; the label names the others.
            off = [(x, y) for x, y in zip(xs, ys) if y > OFF_SCALE * base]
            keep = [i for i, y in enumerate(ys) if y <= OFF_SCALE * base]
            xs, ys, err = [xs[i] for i in keep], [ys[i] for i in keep], [err[i] for i in keep]
            note = f" ({', '.join(f'{x:g}%: {y:.2g}' for x, y in off)} off scale)" if off else ""
            top = max(top, max(y + e for y, e in zip(ys, err)))
            # A std larger than the mean would reach below zero, which a log axis cannot draw: clip it there.
            low = [min(e, 0.95 * y) for y, e in zip(ys, err)]
            ax.errorbar(xs, ys, yerr=[low, err], marker="o", capsize=3, label=f"{m}{note}")
        if selected:
            xs = sorted(selected)
            ax.plot([100 * s for s in xs], [selected[s][f"ppl_{t}"] for s in xs], "k--", marker="x",
                    label="nirvana, KL-selected calibration set")  # fmt: skip
        if f"ppl_{t}" in dense:
            ax.axhline(base, color="gray", linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.set_ylim(0.9 * base, 1.3 * top)
        ax.set_xticks([100 * s for s in sparsities if _runs(results, sparsity=s, gamma=DEFAULT_GAMMA)])
        ax.set_xlabel("sparsity (% of attention+MLP parameters)")
        ax.set_ylabel(f"perplexity on {t} (log scale)")
        ax.set_title(t)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{results['settings']['model']}: perplexity after pruning, mean ± std over calibration seeds "
        "(gamma 3, no fine-tuning)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--calib", default="austen")
    p.add_argument("--eval", nargs="+", default=list(corpus.EVAL_TEXTS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.2, 0.3, 0.4, 0.5])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument(
        "--first-seed", type=int, default=0, metavar="F",
        help="the methods study runs seeds F..SEEDS-1 only: a study split over processes, whose files --merge "
        "joins (the select study still takes all SEEDS, from --scores-cache)",
    )  # fmt: skip
    p.add_argument(
        "--scores-cache", default=None, metavar="DIR",
        help="keep each calibration draw's scores here, and read them back instead of scoring again (across "
        "processes and resumed runs)",
    )  # fmt: skip
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument(
        "--calib-seq-len",
        type=int,
        default=None,
        help="tokens per calibration window for every row (default: each row's own, as nirvana prune: nirvana 512, "
        "nirvana-paper and the baselines 128)",
    )
    p.add_argument("--heldout-samples", type=int, default=16)
    p.add_argument("--allocation", choices=("global", "uniform"), default=None, help="default: each method's own")
    p.add_argument(
        "--studies",
        nargs="*",
        default=["methods", "select", "gamma"],
        choices=STUDIES,
        help="methods: every --methods row; select, gamma: NIRVANA's KL selection and gamma sweep; variance: "
        "NIRVANA variants over --variance-seeds calibration seeds (not run by default)",
    )
    p.add_argument("--variance-seeds", type=int, default=5, metavar="S", help="calibration seeds per variant")
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
        help=f"variance-study variants to run, in this order (default: all, {', '.join(VARIANTS)})",
    )  # fmt: skip
    p.add_argument(
        "--tag",
        default=None,
        help="results go to quality-<model>-<tag>.json/.md/.png, e.g. for a smaller evaluation that must "
        "not touch the committed results",
    )
    p.add_argument("--recover", type=int, default=0, metavar="N", help="LoRA fine-tuning steps (0: no recovery)")
    p.add_argument("--recover-sparsity", type=float, default=0.3)
    p.add_argument(
        "--recover-seeds", type=int, default=3, metavar="N",
        help=f"recover each of {', '.join(RECOVER_METHODS)} from calibration seeds 0..N-1",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--render-only", action="store_true", help="only rewrite the table and plot from the JSON file")
    p.add_argument(
        "--merge", nargs="+", default=[], metavar="FILE",
        help="first add the runs of other results files of the same settings (a study split over processes)",
    )  # fmt: skip
    args = p.parse_args(argv)
    for s in args.sparsities:
        if not 0 < s < 1:
            p.error(f"--sparsities: {s} is not in (0, 1)")
    if args.tag is not None and not TAG_PATTERN.fullmatch(args.tag):
        p.error(f"--tag: {args.tag!r} must be letters, digits, '.', '_' or '-'")
    if args.seeds < 1:
        p.error(f"--seeds: must be >= 1, got {args.seeds}")
    if not 0 <= args.first_seed < args.seeds:
        p.error(f"--first-seed: must be in [0, --seeds), got {args.first_seed}")
    if args.recover < 0:
        p.error(f"--recover: must be >= 0, got {args.recover}")
    if args.recover_seeds < 1:
        p.error(f"--recover-seeds: must be >= 1, got {args.recover_seeds}")
    if not 0 < args.recover_sparsity < 1:
        p.error(f"--recover-sparsity: {args.recover_sparsity} is not in (0, 1)")
    if args.variance_seeds < 1:
        p.error(f"--variance-seeds: must be >= 1, got {args.variance_seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])

    try:
        for method in args.methods:  # before the model loads: a contradiction costs nothing
            row_settings(method, args.allocation)
        check_scores_cache(args)
        bench = Bench(args)
        _check_variance_seeds(bench.results, args)
        for other in args.merge:
            merge_results(bench.results, Path(other))
        if args.merge:
            bench.save()
    except ValueError as e:
        print(f"quality.py: error: {e}", file=sys.stderr)
        return 2
    seeds = list(range(args.seeds))
    if not args.render_only:
        bench.dense()
        # Seed-major, so an interrupted run still has every method at every sparsity for the first seeds.
        for seed in seeds[args.first_seed :] if "methods" in args.studies else []:
            for method in args.methods:
                if method in baselines.DATA_FREE and seed > 0:
                    continue  # magnitude is deterministic; random is 50-1000x worse than any other at one seed
                for s in args.sparsities:
                    bench.pruned(method, seed, s)
        if "select" in args.studies and "nirvana" in args.methods and len(seeds) > 1:
            for s in args.sparsities:
                bench.select_study(s, seeds)
        if "gamma" in args.studies and "nirvana" in args.methods:
            for s in args.sparsities:
                for g in GAMMA_SWEEP:
                    bench.pruned("nirvana", 0, s, g)
                bench.gamma_auto(s)
        # Seed-major, as above: an interrupted run has every method recovered from the first seeds.
        for seed in range(args.recover_seeds) if args.recover else []:
            for m in RECOVER_METHODS:
                if m in args.methods:
                    bench.recovered(m, seed, args.recover_sparsity, args.recover)
        if "variance" in args.studies:
            # Variant-major, cheap variants first: an interrupted run has whole variants over every seed.
            for name in args.variants:
                for seed in range(args.variance_seeds):
                    for s in args.sparsities:
                        try:
                            bench.variance(name, seed, s)
                        except (ValueError, RuntimeError) as e:  # one bad row must not end an hours-long study
                            print(f"{variance_key(name, seed, s)}: failed, not recorded: {e}", file=sys.stderr)
                            continue
                        write_outputs(bench, args, command)  # the tables follow the run as it goes
    stem = write_outputs(bench, args, command)
    print(f"wrote {stem}.md, {stem}.json and {stem}.png")
    return 0


def upgraded(data: dict, calib_seq_len: int | None) -> dict:
    """A results file from before rows had their method's own window length (``calib_seq_len`` 128 for every
    row), for a run with each row's own (``calib_seq_len`` None): its runs stay valid under their keys, which
    name a length only when it is not :data:`BASE_SEQ_LEN`, and NIRVANA's rows at 512 get keys of their own."""
    settings = data.get("settings") or {}
    if calib_seq_len is None and settings.get("calib_seq_len") == BASE_SEQ_LEN:
        data["settings"] = settings | {"calib_seq_len": None}
    return data


def merge_results(results: dict, other: Path) -> int:
    """Add to ``results`` the runs of the results file ``other`` that it lacks (a study split over processes
    or machines, each with its own ``--tag``); returns how many. A ValueError for other settings or variance
    seeds, or for a run both hold with other figures (two different runs under one key)."""
    data = upgraded(json.loads(Path(other).read_text()), (results.get("settings") or {}).get("calib_seq_len", 0))
    for key in ("settings", "variance_seeds"):
        if key in data and key in results and data[key] != results[key]:
            raise ValueError(f"--merge: {other} has {key} {data[key]!r}, these results {results[key]!r}")
    added = 0
    for key, run in data.get("runs", {}).items():
        mine = results["runs"].get(key)
        if mine is None:
            results["runs"][key] = run
            added += 1
        elif not all(_same_figure(mine.get(f), v) for f, v in run.items() if f.startswith(("ppl_", "kl_"))):
            raise ValueError(f"--merge: {other} holds other figures for {key!r}")
    results.setdefault("merged_from", []).append(Path(other).name)
    return added


def _same_figure(a, b) -> bool:
    """Whether two processes' figures are one run's: equal up to the float rounding that another thread count
    gives (a relative 1e-3; 1e-5 absolute for a KL near 0), where another run's differ by far more."""
    return isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-5)


def _check_variance_seeds(results: dict, args) -> None:
    """Record the variance study's seed count in the results, refusing another: with another S, the
    multi-draw rows would score other calibration seeds under the same keys."""
    if "variance" not in args.studies:
        return
    have = results.setdefault("variance_seeds", args.variance_seeds)
    if have != args.variance_seeds:
        raise ValueError(
            f"--variance-seeds: the results hold a variance study over {have} seeds, got {args.variance_seeds}; "
            "pass the same count, or another --tag"
        )


def write_outputs(bench: Bench, args, command: str) -> Path:
    """The markdown tables and the plot from the results so far; returns their path stem."""
    texts = list(bench.windows)
    stem = bench.json_path.with_suffix("")
    rows = {*args.methods, "nirvana"}
    results = current_results(bench.results, {m: bench.identity(m) for m in rows})
    has_methods = any(k.count("|") and not k.startswith("variance|") for k in results["runs"])
    # The variants asked for, in that order, then any other the results hold (an earlier run's).
    present = sorted({r["variant"] for k, r in results["runs"].items() if k.startswith("variance|")})
    variants = list(args.variants) + [v for v in present if v not in args.variants]
    text = (
        render(results, args.methods, args.sparsities, texts, command, args.recover_seeds)
        if has_methods
        else _header(results, texts, command)
    )
    if any(k.startswith("variance|") for k in results["runs"]):
        num_seeds = results.get("variance_seeds", args.variance_seeds)
        text += "\n" + render_variance(results, variants, args.sparsities, texts, num_seeds)
        if not has_methods:
            plot_variance(results, variants, args.sparsities, texts, Path(f"{stem}.png"))
    if has_methods:
        plot(results, args.methods, args.sparsities, texts, Path(f"{stem}.png"))
    Path(f"{stem}.md").write_text(text + "\n")
    return stem


def _header(results: dict, texts: list[str], command: str) -> str:
    env = results.get("environment", {})
    dense = results["runs"].get("dense", {})
    return "\n".join(
        [
            f"# Quality: {results['settings']['model']}",
            "",
            f"Date {env.get('date', '?')}; {env.get('machine', '?')}. Command: `{command}`.",
            "",
            f"Settings: {json.dumps(results['settings'])}.",
            "",
            f"Dense: {dense.get('params', 0) / 1e6:.1f}M parameters, "
            + ", ".join(f"perplexity {dense.get(f'ppl_{t}', float('nan')):.2f} on {t}" for t in texts)
            + ".",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
