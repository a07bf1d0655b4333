"""report.json and the per-layer plot written beside every pruned checkpoint."""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path

import torch

from .plan import PruningPlan

REPORT_FILE = "report.json"
PLOT_FILE = "layers.png"


def versions() -> dict:
    import transformers

    from nirvana_kernels import __version__ as nirvana_version

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # no Triton wheels off Linux; the references still run
        triton_version = None
    return {
        "nirvana": nirvana_version,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def peak_memory(device: torch.device | None) -> dict:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"host": rss}
    if device is not None and device.type == "cuda":
        out["device"] = torch.cuda.max_memory_allocated(device)
    return out


def per_layer(plan: PruningPlan) -> list[dict]:
    """Each layer's kept widths; an encoder-decoder's decoder layers add their cross-attention's heads."""
    g = plan.geometry
    rows = []
    for i, lp in enumerate(plan.layers):
        row = {
            "layer": i,
            "kv_groups": len(lp.kv_groups_kept),
            "query_heads": len(lp.kv_groups_kept) * g.group_size,
            "mlp_width": len(lp.mlp_channels_kept),
        }
        if lp.cross_kv_groups_kept is not None:
            row["cross_heads"] = len(lp.cross_kv_groups_kept) * g.group_size
        rows.append(row)
    return rows


def build_report(
    *,
    settings: dict,
    plan: PruningPlan,
    params_before: int,
    params_after: int,
    timings: dict,
    device: torch.device | None,
    extra: dict | None = None,
) -> dict:
    report = {
        "settings": settings,
        "sparsity": {"target": settings.get("sparsity"), "achieved": plan.achieved_sparsity()},
        "params": {
            "before": params_before,
            "after": params_after,
            "prunable_before": plan.geometry.prunable_params,
            "prunable_after": plan.kept_params(),
        },
        "per_layer": per_layer(plan),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_memory_bytes": peak_memory(device),
        "versions": versions(),
    }
    report.update(extra or {})
    return report


def plot_layers(plan: PruningPlan, path: str | Path, title: str = "") -> Path:
    """A PNG with the kept KV groups and the MLP width of every layer, against the dense sizes."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    g = plan.geometry
    rows = per_layer(plan)
    layers = [r["layer"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    ax1.bar(layers, [r["kv_groups"] for r in rows], color="#4c72b0")
    ax1.axhline(g.num_kv_heads, color="grey", ls="--", lw=1, label=f"dense ({g.num_kv_heads})")
    ax1.set_ylabel("KV groups kept")
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylim(0, g.num_kv_heads + 0.5)
    ax1.legend(loc="lower right")
    ax2.bar(layers, [r["mlp_width"] for r in rows], color="#dd8452")
    ax2.axhline(g.intermediate_size, color="grey", ls="--", lw=1, label=f"dense ({g.intermediate_size})")
    ax2.set_ylabel("MLP width")
    ax2.set_xlabel("layer")
    ax2.legend(loc="lower right")
    fig.suptitle(title or f"{plan.architecture}: {plan.achieved_sparsity():.1%} of attention+MLP removed")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_report(folder: str | Path) -> dict:
    """A pruned folder's report.json, checked to hold what :func:`summarize` reads; a ValueError names the file
    and the first missing or mistyped key."""
    from .checkpoint import PLAN_FILE  # here: the kernels that checkpoint imports are not needed to read a report

    folder = Path(folder)
    path = folder / REPORT_FILE
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise ValueError(f"DIR: {str(folder)!r} {what}; pass the --out folder of a nirvana prune run")
    if not path.is_file():
        if (folder / PLAN_FILE).is_file():
            raise ValueError(
                f"DIR: {str(folder)!r} holds a {PLAN_FILE} but no {REPORT_FILE} (nirvana apply writes none); "
                "the report is in the folder nirvana prune wrote"
            )
        raise ValueError(
            f"DIR: {str(folder)!r} holds no {REPORT_FILE}, so nirvana prune did not write it; "
            "pass the --out folder of a prune run"
        )
    try:
        report = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"report: {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"report: {str(path)!r} is not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"report: {str(path)!r} is not a report (JSON nested too deeply)") from None
    try:
        check_report(report)
    except ValueError as e:
        raise ValueError(f"report: {str(path)!r} is not a nirvana report ({e})") from None
    return report


_NUMBER = (int, float)
_KIND_NAMES = {dict: "a JSON object", list: "a list", str: "a string", int: "an integer"}


def _field(obj, where: str, name: str, kinds: tuple, optional: bool = False):
    """``obj[name]`` when it is one of ``kinds`` (never a bool); else a ValueError naming ``where.name``."""
    key = f"{where}.{name}" if where else name
    if not isinstance(obj, dict):
        raise ValueError(f"{where!r} is not an object")
    if name not in obj:
        if optional:
            return None
        raise ValueError(f"missing key {key!r}")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kinds):
        wanted = "a number" if kinds == _NUMBER else _KIND_NAMES[kinds[0]]
        raise ValueError(f"key {key!r} is {value!r:.60}, expected {wanted}")
    return value


def check_report(report: dict) -> None:
    """ValueError naming the first key :func:`summarize` needs that is missing or of the wrong type."""
    if not isinstance(report, dict):
        raise ValueError(f"expected a JSON object, got {type(report).__name__}")
    _field(report, "", "settings", (dict,))
    sparsity = _field(report, "", "sparsity", (dict,))
    for name in ("target", "achieved"):
        _field(sparsity, "sparsity", name, _NUMBER)
    params = _field(report, "", "params", (dict,))
    if _field(params, "params", "before", _NUMBER) <= 0:
        raise ValueError(f"key 'params.before' is {params['before']!r}, expected a positive number")
    _field(params, "params", "after", _NUMBER)
    for i, row in enumerate(_field(report, "", "per_layer", (list,))):
        for name in ("kv_groups", "mlp_width"):
            _field(row, f"per_layer[{i}]", name, (int,))
    timings = _field(report, "", "timings_s", (dict,))
    for name in timings:
        _field(timings, "timings_s", name, _NUMBER)
    memory = _field(report, "", "peak_memory_bytes", (dict,))
    _field(memory, "peak_memory_bytes", "host", _NUMBER)
    _field(memory, "peak_memory_bytes", "device", _NUMBER, optional=True)
    evaluation = _field(report, "", "evaluation", (dict,), optional=True)
    if evaluation is not None:
        _field(evaluation, "evaluation", "text", (str,))
        for name in ("dense", "pruned"):
            _field(evaluation, "evaluation", name, _NUMBER)
    selection = _field(report, "", "selection", (dict,), optional=True)
    for i, trial in enumerate(_field(selection or {}, "selection", "trials", (list,), optional=True) or []):
        where = f"selection.trials[{i}]"
        _field(trial, where, "seed", (int,))
        _field(trial, where, "gamma", _NUMBER)
        if trial.get("kl") is not None:  # None: a trial that could not be measured, left out of the summary
            _field(trial, where, "kl", _NUMBER)


def method_label(settings: dict) -> str:
    """What pruned the model, in words: NIRVANA with its saliency and objective, or a baseline's name."""
    method = settings.get("method", "nirvana")  # reports written before --method existed
    if method != "nirvana":
        return str(method)
    return f"nirvana ({settings.get('saliency')} saliency, {settings.get('objective')} objective)"


def summarize(report: dict) -> str:
    """A few readable lines from a report.json."""
    s, p, t = report["sparsity"], report["params"], report["timings_s"]
    settings = report["settings"]
    widths = report["per_layer"]
    gamma = report.get("selection", {}).get("gamma", settings.get("gamma"))
    mem = report["peak_memory_bytes"]
    device_mem = f", device {mem['device'] / 2**30:.2f} GiB" if "device" in mem else ""
    lines = [
        f"model: {settings.get('model')}  method: {method_label(settings)}"
        f"  allocation: {settings.get('allocation')}  gamma: {gamma}",
        f"sparsity: target {s['target']:.3f}, achieved {s['achieved']:.4f} (of attention+MLP parameters)",
        f"parameters: {p['before']:,} -> {p['after']:,} ({1 - p['after'] / p['before']:.1%} fewer overall)",
        "kv groups per layer: " + " ".join(str(w["kv_groups"]) for w in widths),
        "mlp width per layer: " + " ".join(str(w["mlp_width"]) for w in widths),
        "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()),
        f"peak memory: host {mem['host'] / 2**30:.2f} GiB{device_mem}",
    ]
    if "evaluation" in report:
        e = report["evaluation"]
        lines.append(f"perplexity on {e['text']}: dense {e['dense']:.2f}, pruned {e['pruned']:.2f}")
    if "selection" in report and report["selection"].get("trials"):
        trials = [tr for tr in report["selection"]["trials"] if tr.get("kl") is not None]
        lines.append(
            "KL selection: " + ", ".join(f"seed {tr['seed']} gamma {tr['gamma']:g}: {tr['kl']:.4f}" for tr in trials)
        )
    return "\n".join(lines)
