"""What comes out: perplexity of pruned models by method and sparsity, on two held-out domains.

Every method goes through the same flow (calibration windows, allocation, compaction); only its scores,
and FLAP's bias compensation, are its own. Each pruned model is scored on:

* perplexity on the first ``--windows`` non-overlapping ``--seq-len``-token windows of each evaluation text:
  ``persuasion`` (the held-out Austen novel, the calibration domain) and ``fortunes`` (Debian's fortune
  collections, another domain, fetched by ``nirvana.corpus.fortunes_path``);
* KL(dense || pruned), token mean, on the same windows of the first evaluation text;
* achieved sparsity (attention+MLP linear parameters) and parameter count, so no method is compared at
  another size.

Data-dependent methods run once per calibration seed (``--seeds``); tables give mean ± half the spread
(max - min) / 2 over seeds. Each method uses the allocation ``nirvana prune --method M`` uses by default, its
paper's (``Method.allocation`` in ``nirvana.methods``), unless ``--allocation`` is given: NIRVANA and FLAP rank
globally (FLAP's scores are standardised per layer for exactly that), LLM-Pruner (``taylor``), Wanda-SP,
magnitude and random prune the same share of every layer. ``nirvana-uniform`` (NIRVANA scores, uniform
allocation, i.e. ``--allocation uniform``) separates the two ingredients.

Studies (``--studies``), on calibration-side data only, never on the evaluation texts:

* ``select``: KL selection of the calibration set. Among the ``--seeds`` NIRVANA calibration sets, the
  one whose pruned model has the lowest KL to the dense model on the calibration text's held-out tail
  (``nirvana.selection.select``, as ``--select-calib K`` does) against the mean over the seeds.
* ``gamma``: NIRVANA (seed 0) at gamma 1, 2, 3, 4 and ``auto`` (chosen by the same calibration-side KL from
  ``selection.GAMMA_GRID``).

``--recover N`` adds, for ``nirvana``, ``taylor`` and ``magnitude`` (seed 0, at ``--recover-sparsity``), the
perplexity after N LoRA steps of ``nirvana finetune`` on the calibration text.

Results go to ``<out>/quality-<model>.json`` as they come (a rerun with the same settings skips what is
there, so an interrupted run resumes), then ``quality-<model>.md`` (tables) and ``quality-<model>.png``.

Usage:
    python benchmarks/quality.py [--model smollm2|FOLDER] [--calib austen|PATH]
        [--eval persuasion fortunes PATH ...] [--methods nirvana taylor ...] [--sparsities 0.2 0.3 0.4]
        [--seeds 3] [--windows 24] [--seq-len 512] [--num-samples 32] [--calib-seq-len 128]
        [--studies select gamma] [--recover N] [--recover-sparsity 0.3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

try:
    import nirvana  # noqa: F401
except ImportError:  # a bare checkout that was never pip-installed: use this repository's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nirvana import baselines, calibration, corpus, selection
from nirvana.adapters import get_adapter
from nirvana.allocation import allocate
from nirvana.evaluation import kl_divergence, text_windows
from nirvana.models import load_model
from nirvana.pruning import PruneSettings, count_params
from nirvana.saliency import compute_scores

METHODS = ("nirvana", "nirvana-uniform", "taylor", "flap", "wanda-sp", "magnitude", "random")
# The benchmark's rows that are not a --method of their own: NIRVANA's scores, allocated uniformly
# (what `nirvana prune --allocation uniform` does).
VARIANT_ALLOCATION = {"nirvana-uniform": "uniform"}
RECOVER_METHODS = ("nirvana", "taylor", "magnitude")
GAMMA_SWEEP = (1.0, 2.0, 3.0, 4.0)
DEFAULT_GAMMA = 3.0


def allocation_of(method: str, override: str | None = None) -> str:
    """The allocation a row prunes with: ``override`` (``--allocation``) if given, else what ``nirvana prune
    --method BASE`` uses by default (the method's own), ``nirvana-uniform`` aside."""
    if override is None and method in VARIANT_ALLOCATION:
        return VARIANT_ALLOCATION[method]
    base = "nirvana" if method.startswith("nirvana") else method
    return PruneSettings(method=base, allocation=override).resolved_allocation


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
        label = Path(args.model).name if os.sep in args.model else args.model
        self.json_path = Path(args.out) / f"quality-{label}.json"
        self.results = self._load_results()
        self._dense_logits = None
        self._scores: dict = {}

    def _settings(self) -> dict:
        a = self.args
        return {
            "model": a.model,
            "calib": a.calib,
            "eval": list(self.windows),
            "windows": a.windows,
            "seq_len": a.seq_len,
            "num_samples": a.num_samples,
            "calib_seq_len": a.calib_seq_len,
            "heldout_samples": a.heldout_samples,
        }

    def _load_results(self) -> dict:
        if self.json_path.is_file():
            data = json.loads(self.json_path.read_text())
            if data.get("settings") == self._settings():
                return data
            print(f"{self.json_path}: other settings, starting afresh", file=sys.stderr)
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

    def calibration(self, seed: int) -> torch.Tensor:
        return calibration.calibration_windows(
            self.args.calib,
            self.tokenizer,
            num_samples=self.args.num_samples,
            seq_len=self.args.calib_seq_len,
            seed=seed,
        )

    def scores(self, method: str, seed: int):
        """(Scores, FLAP statistics or None) for a method and calibration seed; computed once per process."""
        base = "nirvana" if method.startswith("nirvana") else method
        key = (base, seed)
        if key not in self._scores:
            start = time.perf_counter()
            stats = None
            windows = None if base in baselines.DATA_FREE else self.calibration(seed)
            if base == "nirvana":
                scores = compute_scores(self.model, windows, objective="maxlogit", saliency="taylor", progress=False)
            elif base == "flap":
                stats = baselines.activation_statistics(self.model, windows, progress=False)
                scores = baselines.flap_scores(self.model, stats)
            else:
                scores = baselines.method_scores(self.model, windows, base, seed=seed, progress=False)
            self._scores[key] = (scores, stats, time.perf_counter() - start)
        return self._scores[key]

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
            )
            return record

        return self.run(f"{method}|seed={seed}|s={sparsity}|gamma={gamma}", build)

    def dense(self) -> dict:
        def build():
            record = self.evaluate(self.model)
            record.update(method="dense", params=count_params(self.model), achieved_sparsity=0.0)
            return record

        return self.run("dense", build)

    def heldout(self) -> torch.Tensor:
        return calibration.heldout_windows(
            self.args.calib,
            self.tokenizer,
            num_samples=self.args.heldout_samples,
            seq_len=self.args.calib_seq_len,
            seed=0,
        )

    def select_study(self, sparsity: float, seeds: list[int]) -> dict:
        def build():
            candidates = [selection.Candidate(s, self.scores("nirvana", s)[0]) for s in seeds]
            chosen = selection.select(
                self.model, candidates, self.heldout(), sparsity=sparsity, gammas=[DEFAULT_GAMMA],
                allocation=allocation_of("nirvana", self.args.allocation), architecture=self.architecture,
            )  # fmt: skip
            return {"study": "select", "sparsity": sparsity, "seed": chosen.seed, "trials": chosen.trials}

        record = self.run(f"select|s={sparsity}", build)
        return self.pruned("nirvana", record["seed"], sparsity) | {"selected_seed": record["seed"]}

    def gamma_auto(self, sparsity: float) -> dict:
        def build():
            candidates = [selection.Candidate(0, self.scores("nirvana", 0)[0])]
            chosen = selection.select(
                self.model, candidates, self.heldout(), sparsity=sparsity, gammas=list(selection.GAMMA_GRID),
                allocation=allocation_of("nirvana", self.args.allocation), architecture=self.architecture,
            )  # fmt: skip
            return {"study": "gamma-auto", "sparsity": sparsity, "gamma": chosen.gamma, "trials": chosen.trials}

        record = self.run(f"gamma-auto|s={sparsity}", build)
        return self.pruned("nirvana", 0, sparsity, record["gamma"])

    def recovered(self, method: str, sparsity: float, steps: int) -> dict:
        def build():
            from nirvana.checkpoint import load_pruned, save_pruned
            from nirvana.finetune import finetune

            plan = self.plan(method, 0, sparsity)
            model = selection.pruned_copy(self.model, plan, self.prepare(method, 0, plan))
            with tempfile.TemporaryDirectory() as tmp:
                save_pruned(model, self.tokenizer, plan, Path(tmp) / "pruned")
                del model
                summary = finetune(
                    Path(tmp) / "pruned", self.args.calib, steps=steps, out=Path(tmp) / "tuned", progress=False
                )
                tuned = load_pruned(Path(tmp) / "tuned")
            record = self.evaluate(tuned)
            record.update(method=method, seed=0, sparsity=sparsity, steps=steps, params=count_params(tuned))
            record["finetune"] = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
            return record

        return self.run(f"recover|{method}|s={sparsity}|steps={steps}", build)


# --------------------------------------------------------------------------------------------------
# Tables and plot
# --------------------------------------------------------------------------------------------------


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"


def _runs(results: dict, **match) -> list[dict]:
    return [
        r
        for k, r in results["runs"].items()
        if "|" in k
        and not k.startswith(("select", "gamma-auto", "recover"))
        and all(r.get(f) == v for f, v in match.items())
    ]


def render(results: dict, methods, sparsities, texts: list[str], command: str) -> str:
    env = results.get("environment", {})
    dense = results["runs"].get("dense", {})
    kl_text = texts[0]
    lines = [
        f"# Quality: {results['settings']['model']} pruned by method and sparsity",
        "",
        f"Date {env.get('date', '?')}; {env.get('machine', '?')}. Command: `{command}`.",
        "",
        f"Settings: {json.dumps(results['settings'])}. Calibration windows are drawn from the calibration "
        "text with each seed; evaluation texts are never used for any choice. Cells with ± are the mean "
        "± half the spread over the calibration seeds (`seeds` counts them). Sparsity: achieved share of the "
        "attention+MLP linear parameters removed. Default gamma 3.",
        "",
        f"Dense: {dense.get('params', 0) / 1e6:.1f}M parameters, "
        + ", ".join(f"perplexity {dense.get(f'ppl_{t}', float('nan')):.2f} on {t}" for t in texts)
        + ".",
        "",
    ]
    for s in sparsities:
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
            cells = [_mean_spread([r[f"ppl_{t}"] for r in runs]) for t in texts]
            kl = _mean_spread([r[f"kl_{kl_text}"] for r in runs])
            lines.append(
                f"| {m} | {runs[0]['allocation']} | {len(runs)} | {'/'.join(f'{a:.2f}%' for a in ach)} | "
                f"{'/'.join(f'{p:.2f}M' for p in params)} | " + " | ".join(cells) + f" | {kl} |"
            )
        lines.append("")
    select = [(k, r) for k, r in results["runs"].items() if k.startswith("select|")]
    if select:
        lines += [
            "## KL-selected calibration set against random calibration sets (NIRVANA)",
            "",
            "The selected set has the lowest KL(dense || pruned) on the calibration text's held-out tail "
            f"({results['settings']['heldout_samples']} windows of {results['settings']['calib_seq_len']} tokens), "
            "among the seeds; `random` is the mean ± half-spread over the same seeds.",
            "",
            "| sparsity | selected seed | " + " | ".join(f"ppl {t} selected | ppl {t} random" for t in texts) + " |",
            "|---|---|" + "---|---|" * len(texts),
        ]
        for _, r in select:
            s = r["sparsity"]
            runs = _runs(results, method="nirvana", sparsity=s, gamma=DEFAULT_GAMMA)
            chosen = next((x for x in runs if x["seed"] == r["seed"]), None)
            if chosen is None:
                continue
            cells = " | ".join(
                f"{chosen[f'ppl_{t}']:.2f} | {_mean_spread([x[f'ppl_{t}'] for x in runs])}" for t in texts
            )
            lines.append(f"| {s:.0%} | {r['seed']} | {cells} |")
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
    recover = [r for k, r in results["runs"].items() if k.startswith("recover|")]
    if recover:
        lines += [
            "## Recovery: LoRA fine-tuning on the calibration text (seed 0)",
            "",
            "| method | sparsity | steps | params | "
            + " | ".join(f"ppl {t} before | ppl {t} after" for t in texts)
            + " |",
            "|---|---|---|---|" + "---|---|" * len(texts),
        ]
        for r in recover:
            before = next(
                iter(_runs(results, method=r["method"], seed=0, sparsity=r["sparsity"], gamma=DEFAULT_GAMMA)), {}
            )
            cells = " | ".join(f"{before.get(f'ppl_{t}', float('nan')):.2f} | {r[f'ppl_{t}']:.2f}" for t in texts)
            lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {r['steps']} | {r['params'] / 1e6:.2f}M | {cells} |")
        lines.append("")
    return "\n".join(lines)


def _selected_runs(results: dict) -> dict[float, dict]:
    """sparsity -> the NIRVANA run of the calibration set KL selection picked (gamma 3)."""
    out = {}
    for key, r in results["runs"].items():
        if key.startswith("select|"):
            runs = _runs(results, method="nirvana", sparsity=r["sparsity"], gamma=DEFAULT_GAMMA, seed=r["seed"])
            if runs:
                out[r["sparsity"]] = runs[0]
    return out


# A method whose perplexity passes this multiple of the dense one is drawn off the plot's scale, so the
# collapsed ones (magnitude, random) do not squash the methods worth comparing.
OFF_SCALE = 50


def plot(results: dict, methods, sparsities, texts: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4.4), squeeze=False)
    dense = results["runs"].get("dense", {})
    selected = _selected_runs(results)
    for ax, t in zip(axes[0], texts):
        base = dense.get(f"ppl_{t}", 1.0)
        top = base
        for m in methods:
            xs, ys, lo, hi = [], [], [], []
            for s in sparsities:
                vals = [r[f"ppl_{t}"] for r in _runs(results, method=m, sparsity=s, gamma=DEFAULT_GAMMA)]
                if vals:
                    xs.append(100 * s)
                    ys.append(statistics.fmean(vals))
                    lo.append(ys[-1] - min(vals))
                    hi.append(max(vals) - ys[-1])
            if not xs:
                continue
            if max(ys) > OFF_SCALE * base:
                ax.plot([], [], " ", label=f"{m}: off scale ({min(ys):.3g} to {max(ys):.3g})")
                continue
            top = max(top, max(y + h for y, h in zip(ys, hi)))
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"{m} (mean, seed range)")
        if selected:
            xs = sorted(selected)
            ax.plot([100 * s for s in xs], [selected[s][f"ppl_{t}"] for s in xs], "k--", marker="x",
                    label="nirvana, KL-selected calibration set")  # fmt: skip
        if f"ppl_{t}" in dense:
            ax.axhline(base, color="gray", linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.set_ylim(0.9 * base, 1.3 * top)
        ax.set_xticks([100 * s for s in sparsities])
        ax.set_xlabel("sparsity (% of attention+MLP parameters)")
        ax.set_ylabel(f"perplexity on {t} (log scale)")
        ax.set_title(t)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['settings']['model']}: perplexity after pruning (gamma 3, no fine-tuning)")
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
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.2, 0.3, 0.4])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--heldout-samples", type=int, default=16)
    p.add_argument("--allocation", choices=("global", "uniform"), default=None, help="default: each method's own")
    p.add_argument("--studies", nargs="*", default=["select", "gamma"], choices=("select", "gamma"))
    p.add_argument("--recover", type=int, default=0, metavar="N")
    p.add_argument("--recover-sparsity", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--render-only", action="store_true", help="only rewrite the table and plot from the JSON file")
    args = p.parse_args(argv)
    for s in args.sparsities:
        if not 0 < s < 1:
            p.error(f"--sparsities: {s} is not in (0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])

    bench = Bench(args)
    seeds = list(range(args.seeds))
    if not args.render_only:
        bench.dense()
        # Seed-major, so an interrupted run still has every method at every sparsity for the first seeds.
        for seed in seeds:
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
        if args.recover:
            for m in RECOVER_METHODS:
                if m in args.methods:
                    bench.recovered(m, args.recover_sparsity, args.recover)
    texts = list(bench.windows)
    stem = bench.json_path.with_suffix("")
    Path(f"{stem}.md").write_text(render(bench.results, args.methods, args.sparsities, texts, command) + "\n")
    plot(bench.results, args.methods, args.sparsities, texts, Path(f"{stem}.png"))
    print(f"wrote {stem}.md, {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
