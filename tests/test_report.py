"""nirvana.report: the summary names the method that ran, and a damaged report.json is one line naming it."""

from __future__ import annotations

import copy
import json
import re

import pytest

from nirvana.report import check_report, load_report, method_label, summarize

REPORT = {
    "settings": {"model": "m", "method": "nirvana", "saliency": "taylor", "objective": "maxlogit", "gamma": 3.0},
    "sparsity": {"target": 0.3, "achieved": 0.2986},
    "params": {"before": 1000, "after": 700, "prunable_before": 900, "prunable_after": 600},
    "per_layer": [{"layer": 0, "kv_groups": 2, "query_heads": 4, "mlp_width": 40}],
    "timings_s": {"load": 1.0, "saliency": 0.5},
    "peak_memory_bytes": {"host": 2**30},
    "selection": {"seed": 0, "gamma": 3.0, "trials": [{"seed": 0, "gamma": 3.0, "kl": 0.01}]},
}


@pytest.mark.parametrize(
    "settings, label",
    [
        ({"method": "nirvana", "saliency": "taylor", "objective": "maxlogit"}, "nirvana (taylor saliency, maxlogit"),
        ({"method": "nirvana", "saliency": "adam", "objective": "ce"}, "nirvana (adam saliency, ce objective)"),
        ({"method": "magnitude", "saliency": "taylor", "objective": "maxlogit"}, "magnitude"),
        ({"method": "wanda-sp", "saliency": "taylor", "objective": "maxlogit"}, "wanda-sp"),
        ({"saliency": "taylor", "objective": "maxlogit"}, "nirvana (taylor saliency"),  # an older report
    ],
    ids=["nirvana", "nirvana-adam-ce", "magnitude", "wanda-sp", "no-method"],
)
def test_summary_names_the_method_that_ran(settings, label):
    report = dict(REPORT, settings={"model": "m", "gamma": 3.0, **settings})
    first = summarize(report).splitlines()[0]
    assert f"method: {label}" in first
    assert method_label(report["settings"]).startswith(label)
    if settings.get("method", "nirvana") != "nirvana":
        assert "taylor" not in first and "maxlogit" not in first


def _without(*path):
    def change(r):
        *parents, last = path
        for key in parents:
            r = r[key]
        del r[last]

    return change


def _with(value, *path):
    def change(r):
        *parents, last = path
        for key in parents:
            r = r[key]
        r[last] = value

    return change


BROKEN = {
    "no-sparsity": (_without("sparsity"), "missing key 'sparsity'"),
    "no-achieved": (_without("sparsity", "achieved"), "missing key 'sparsity.achieved'"),
    "no-params-after": (_without("params", "after"), "missing key 'params.after'"),
    "no-per-layer": (_without("per_layer"), "missing key 'per_layer'"),
    "no-layer-width": (_without("per_layer", 0, "mlp_width"), "missing key 'per_layer[0].mlp_width'"),
    "no-timings": (_without("timings_s"), "missing key 'timings_s'"),
    "no-host-memory": (_without("peak_memory_bytes", "host"), "missing key 'peak_memory_bytes.host'"),
    "no-settings": (_without("settings"), "missing key 'settings'"),
    "no-trial-kl-seed": (_without("selection", "trials", 0, "seed"), "missing key 'selection.trials[0].seed'"),
    "target-a-string": (_with("0.3", "sparsity", "target"), "key 'sparsity.target' is '0.3', expected a number"),
    "sparsity-a-number": (_with(0.3, "sparsity"), "key 'sparsity' is 0.3, expected a JSON object"),
    "params-before-zero": (_with(0, "params", "before"), "key 'params.before' is 0, expected a positive number"),
    "timing-null": (_with(None, "timings_s", "load"), "key 'timings_s.load' is None, expected a number"),
    "evaluation-partial": (_with({"text": "p", "dense": 3.0}, "evaluation"), "missing key 'evaluation.pruned'"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_a_report_missing_keys_is_one_line_naming_the_file_and_key(case, tmp_path):
    change, message = BROKEN[case]
    report = copy.deepcopy(REPORT)
    change(report)
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        check_report(report)
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError) as err:
        load_report(tmp_path)
    text = str(err.value)
    assert "\n" not in text and repr(str(tmp_path / "report.json")) in text and message in text


def test_a_whole_report_loads_and_summarizes(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    assert load_report(tmp_path) == REPORT
    assert "KL selection: seed 0 gamma 3: 0.0100" in summarize(REPORT)


@pytest.mark.parametrize(
    "data, message",
    [(b"{", "is not JSON"), (b"\xff\xfe", "is not UTF-8 text"), (b"[1]", "expected a JSON object, got list")],
    ids=["truncated", "not-utf8", "a-list"],
)
def test_a_report_that_is_not_json_is_one_line(data, message, tmp_path):
    (tmp_path / "report.json").write_bytes(data)
    with pytest.raises(ValueError, match=message) as err:
        load_report(tmp_path)
    assert "\n" not in str(err.value) and "report.json" in str(err.value)


def _write(path):
    path.write_text("{}")
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: t / "nowhere", "does not exist; pass the --out folder of a nirvana prune run"),
        (lambda t: _write(t / "f.txt"), "is not a folder"),
        (lambda t: t, "holds no report.json, so nirvana prune did not write it; pass the --out folder"),
        (lambda t: _write(t / "plan.json").parent, "(nirvana apply writes none)"),
    ],
    ids=["missing", "a-file", "a-dense-folder", "an-apply-output"],
)
def test_a_folder_without_a_report_says_what_to_pass(make, message, tmp_path):
    with pytest.raises(ValueError) as err:
        load_report(make(tmp_path))
    assert message in str(err.value) and str(err.value).startswith("DIR: ")
