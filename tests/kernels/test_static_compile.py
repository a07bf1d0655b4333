"""The ahead-of-time compile check (benchmarks/static_check.py) in CI: every launch the public launchers
make at the 70B-class shapes, compiled for sm_90a and sm_80 through Triton's own launch path, must meet
the checks below. Nothing runs on a device; the check reads the cubin.

The check runs once, in a fresh subprocess with TRITON_INTERPRET unset (this suite sets it, and Triton
reads it when the kernels are defined). Each test is one (model, call, check) over both archs and
every launch of the call; a failure names the launch and the arch.

KNOWN_FAILURES may list a (call, check) that a kernel is known to miss, as a strict xfail with its reason;
it is empty: every check passes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import static_check  # noqa: E402

MODELS = ("llama-3.1-70b", "qwen2.5-72b")  # Qwen2.5-72B adds the q/k/v biases
ARCHS = (90, 80)

# (call, check) -> why it is known to fail, as a strict xfail. Empty since the issue 10 rewrites fixed the
# five problems the first compile showed (the before figures are in benchmarks/results/static-sm90.md).
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _missing_tools() -> str:
    missing = [name for name in ("ptxas", "cuobjdump") if static_check.tool(name) is None]
    return f"{' and '.join(missing)} not found (the triton wheel ships them)" if missing else ""


def _params():
    from shapes import MODELS as ALL

    out = []
    for model in MODELS:
        for case in static_check.cases(ALL[model]):
            for check in static_check.checks_for(case.kind):
                why = KNOWN_FAILURES.get((case.name, check))
                marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
                out.append(pytest.param(model, case.name, check, marks=marks, id=f"{model}|{case.name}|{check}"))
    return out


@pytest.fixture(scope="module")
def rows():
    if why := _missing_tools():
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NIRVANA_POISON_OUTPUTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "static_check.py"), "--json", "-"]
    for model in MODELS:
        cmd += ["--model", model]
    for arch in ARCHS:
        cmd += ["--arch", str(arch)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, f"static_check failed ({done.returncode}):\n{done.stderr[-4000:]}"
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"static_check: {len(out)} compiles in {time.perf_counter() - t0:.0f} s")
    return out


@pytest.mark.parametrize(("model", "case", "check"), _params())
def test_static_compile(rows, model, case, check):
    mine = [r for r in rows if r["model"] == model and r["case"] == case]
    assert {r["arch"] for r in mine} == set(ARCHS), f"{model} {case}: no launch captured for some arch"
    failures = [
        f"{r['launch']} sm_{r['arch']}: {r['checks'][check]}" for r in mine if r["checks"].get(check, "missing")
    ]
    assert not failures, f"{model} {case}, {check}: " + "; ".join(failures)


def test_known_failures_name_real_checks():
    # A typo in the table would xfail nothing and hide a fixed item.
    from shapes import MODELS as ALL

    names = {c.name: c.kind for m in MODELS for c in static_check.cases(ALL[m])}
    for case, check in KNOWN_FAILURES:
        assert case in names, case
        assert check in static_check.checks_for(names[case]), (case, check)
