"""Streaming apply: the same tensors and config as compacting in memory, bounded shards, careful errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from nirvana import cli
from nirvana.adapters import get_adapter
from nirvana.allocation import allocate
from nirvana.apply import INDEX_FILE, WEIGHTS_FILE, apply_plan, parse_size
from nirvana.checkpoint import load_pruned, save_pruned
from nirvana.compaction import compact_model
from tests.conftest import requires_cuda
from tests.helpers import assert_bitwise_equal
from tests.tiny_models import tiny_batch, tiny_model, tiny_tokenizer

EAGER = {"attn_implementation": "eager"}
SHARD = 30_000  # bytes: the tiny models (~100 kB in float32) then span several shards


def make_plan(model, allocation: str, seed: int = 0):
    g = get_adapter(model).geometry(model.config)
    gen = torch.Generator().manual_seed(seed)
    attn = torch.rand(g.num_layers, g.num_kv_heads, generator=gen)
    mlp = torch.rand(g.num_layers, g.intermediate_size, generator=gen)
    arch = model.config.architectures[0]
    plan = allocate(attn, mlp, g, sparsity=0.3, allocation=allocation, round_to=1, architecture=arch)
    assert plan.is_uniform() == (allocation == "uniform"), "the seed should give the kind of plan the test is about"
    return plan


def dense_folder(tmp_path: Path, arch: str, sharded: bool, **overrides) -> Path:
    src = tmp_path / f"dense-{arch}"
    model = tiny_model(arch, **overrides)
    model.save_pretrained(src, max_shard_size=SHARD if sharded else "1GB")
    tiny_tokenizer().save_pretrained(src)
    return src


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint folder (its model*.safetensors; a pruned folder's scores and means aside)."""
    out = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                assert name not in out, f"{name} is in two shards"
                out[name] = f.get_tensor(name)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_batch()).logits


def run(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


CASES = [("llama", "global", True), ("qwen2", "global", True), ("gemma2", "global", True), ("llama", "uniform", False)]
CASE_IDS = ["llama", "qwen2-biases", "gemma2-tied-embeddings", "llama-uniform-1-file"]


@pytest.mark.parametrize(("arch", "allocation", "sharded"), CASES, ids=CASE_IDS)
def test_apply_writes_what_compacting_in_memory_saves(arch, allocation, sharded, tmp_path, capsys):
    src = dense_folder(tmp_path, arch, sharded)
    before = snapshot(src)
    dense = transformers.AutoModelForCausalLM.from_pretrained(src, **EAGER)
    plan = make_plan(dense, allocation)
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    compacted = compact_model(dense, plan)
    in_memory = save_pruned(compacted, tiny_tokenizer(), plan, tmp_path / "in-memory")

    out = tmp_path / "applied"
    code, stdout, err = run(
        ["apply", plan_path, "--model", src, "--out", out, "--max-shard-size", SHARD, "--device", "cpu"], capsys
    )
    assert code == 0, err
    assert str(out) in stdout

    got, want = tensors(out), tensors(in_memory)
    assert sorted(got) == sorted(want)
    for name in want:
        assert_bitwise_equal(got[name], want[name], name=name)
    assert json.loads((out / "config.json").read_text()) == json.loads((in_memory / "config.json").read_text())
    assert json.loads((out / "plan.json").read_text()) == plan.to_dict()
    assert (out / "modeling_nirvana.py").exists() == (allocation != "uniform")
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert snapshot(src) == before, "the source folder changed"

    # The shards hold at most SHARD bytes each (a larger tensor alone), and the index lists them all.
    shards = sorted(out.glob("*.safetensors"))
    if len(shards) > 1:
        index = json.loads((out / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(got)
        assert set(index["weight_map"].values()) == {p.name for p in shards}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    else:
        assert shards == [out / WEIGHTS_FILE] and not (out / INDEX_FILE).exists()
    for shard in shards:
        sizes = [t.numel() * t.element_size() for t in tensors_in(shard)]
        assert sum(sizes) <= SHARD or len(sizes) == 1, f"{shard.name}: {sum(sizes)} bytes in {len(sizes)} tensors"

    want_logits = logits(compacted)
    assert_bitwise_equal(logits(load_pruned(out, **EAGER)), want_logits, name="load_pruned logits")
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **EAGER).eval()
    assert_bitwise_equal(logits(remote), want_logits, name="from_pretrained logits")


def tensors_in(shard: Path) -> list[torch.Tensor]:
    with safe_open(shard, framework="pt") as f:
        return [f.get_tensor(n) for n in f.keys()]


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("apply")
    src = dense_folder(tmp, "llama", sharded=True)
    plan = make_plan(tiny_model("llama"), "global")
    plan.save(tmp / "plan.json")
    return src, tmp / "plan.json"


def test_apply_skips_the_kernels_index_check(llama_src, tmp_path, monkeypatch):
    # The plan is validated once when read; the gathers then launch without reading an index back.
    import nirvana_kernels._checks as checks

    def refuse(*_a):
        raise AssertionError("apply asked the kernels to check an index it built from the plan")

    src, plan = llama_src
    monkeypatch.setattr(checks, "_index_values", refuse)
    apply_plan(plan, src, tmp_path / "out", device="cpu")
    assert (tmp_path / "out" / "config.json").is_file()


def test_overwrite_replaces_the_folder(llama_src, tmp_path):
    src, plan = llama_src
    out = tmp_path / "out"
    apply_plan(plan, src, out, device="cpu")  # --overwrite replaces only a folder nirvana wrote
    (out / "old.txt").write_text("old")
    apply_plan(plan, src, out, overwrite=True, device="cpu")
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["source", "parent"], ids=["source", "parent-of-source"])
def test_out_that_would_replace_the_source_is_refused(where, llama_src):
    src, plan = llama_src
    before = snapshot(src)
    with pytest.raises(ValueError, match="would replace the model's source folder"):
        apply_plan(plan, src, src if where == "source" else src.parent, overwrite=True, device="cpu")
    assert snapshot(src) == before


def test_failure_mid_write_leaves_nothing(llama_src, tmp_path, monkeypatch):
    import nirvana.apply as apply_module

    src, plan = llama_src
    real, calls = apply_module.output_tensor, []

    def fail_on_the_third(spec, device):
        calls.append(spec.name)
        if len(calls) == 3:
            raise OSError("simulated failure mid-write")
        return real(spec, device)

    monkeypatch.setattr(apply_module, "output_tensor", fail_on_the_third)
    with pytest.raises(OSError, match="simulated"):
        apply_plan(plan, src, tmp_path / "out", device="cpu")
    assert list(tmp_path.iterdir()) == []


def _geometry_plan(tmp_path):
    other = tiny_model("llama", intermediate_size=64)
    g = get_adapter(other).geometry(other.config)
    plan = allocate(torch.rand(2, 2), torch.rand(2, 64), g, sparsity=0.3, round_to=1)
    plan.save(tmp_path / "other.json")
    return tmp_path / "other.json"


def _pruned_source(tmp_path, src, plan):
    apply_plan(plan, src, tmp_path / "pruned", device="cpu")
    return plan


BAD = {
    "missing-plan": (lambda tmp, src, plan: (tmp / "nope.json", src, []), "plan: "),
    "bad-plan-json": (lambda tmp, src, plan: (_write(tmp / "bad.json", '{"version": 1}'), src, []), "plan: "),
    "other-geometry": (lambda tmp, src, plan: (_geometry_plan(tmp), src, []), "plan.geometry: "),
    "out-exists": (lambda tmp, src, plan: (plan, src, []), "already exists; pass --overwrite"),
    "missing-model": (lambda tmp, src, plan: (plan, tmp / "nowhere", []), "model: "),
    "pruned-source": (
        lambda tmp, src, plan: (_pruned_source(tmp, src, plan), tmp / "pruned", []),
        "was pruned already",
    ),
    "bad-shard-size": (lambda tmp, src, plan: (plan, src, ["--max-shard-size", "lots"]), "max_shard_size: "),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, llama_src, tmp_path, capsys):
    make, message = BAD[case]
    src, plan = llama_src
    plan_arg, src_arg, extra = make(tmp_path, src, plan)
    out = tmp_path / "out"
    if case == "out-exists":
        out.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run(["apply", plan_arg, "--model", src_arg, "--out", out, *extra], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nirvana: error: ") and message in lines[0], err
    assert "Traceback" not in err and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"


SIZES = [(123, 123), ("20KB", 20_000), ("5GB", 5 * 10**9), ("500MiB", 500 << 20), ("1.5 GiB", 3 << 29)]


@pytest.mark.parametrize(("text", "expected"), SIZES, ids=[str(s) for s, _ in SIZES])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["lots", "5XB", "", 0, -1, True, 1.5], ids=["word", "unit", "empty", "0", "-1", "bool", "float"]
)
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(bad)


@requires_cuda
@pytest.mark.cuda
def test_gpu_apply_gives_the_same_bits_as_cpu(llama_src, tmp_path):
    src, plan = llama_src
    cpu = apply_plan(plan, src, tmp_path / "cpu", device="cpu")
    gpu = apply_plan(plan, src, tmp_path / "gpu", device="cuda")
    got, want = tensors(gpu), tensors(cpu)
    assert sorted(got) == sorted(want)
    for name in want:
        assert_bitwise_equal(got[name], want[name], name=name)


@pytest.mark.parametrize("flags", [["--method", "flap"], ["--compensate", "bias"]], ids=["flap", "compensate-bias"])
def test_apply_of_a_compensated_plan_writes_what_prune_wrote(flags, tmp_path, capsys):
    from tests.test_pruning import write_text

    src = dense_folder(tmp_path, "llama", sharded=True)
    calib = write_text(tmp_path / "calib.txt")
    pruned = tmp_path / "pruned"
    argv = ["prune", src, "--sparsity", "0.3", "--calib", calib, "--num-samples", "4", "--seq-len", "16"]
    code, _, err = run([*argv, "--round-to", "1", "--device", "cpu", "--out", pruned, *flags], capsys)
    assert code == 0, err
    assert (pruned / "compensation.safetensors").is_file()

    applied = tmp_path / "applied"
    code, _, err = run(["apply", pruned, "--model", src, "--out", applied, "--device", "cpu"], capsys)
    assert code == 0, err
    got, want = tensors(applied), tensors(pruned)
    assert sorted(got) == sorted(want) and any(n.endswith("o_proj.bias") for n in want)
    for name in want:
        assert_bitwise_equal(got[name], want[name], name=name)
    assert json.loads((applied / "config.json").read_text()) == json.loads((pruned / "config.json").read_text())
    assert (applied / "compensation.safetensors").read_bytes() == (pruned / "compensation.safetensors").read_bytes()

    # A plan.json on its own finds no means; --compensation names them.
    alone = tmp_path / "plan.json"
    alone.write_bytes((pruned / "plan.json").read_bytes())
    code, _, err = run(["apply", alone, "--model", src, "--out", tmp_path / "again", "--device", "cpu"], capsys)
    assert code == 2 and "compensation.safetensors" in err and len(err.strip().splitlines()) == 1
    means = ["--compensation", pruned / "compensation.safetensors"]
    code, _, err = run(["apply", alone, "--model", src, "--out", tmp_path / "again", "--device", "cpu", *means], capsys)
    assert code == 0, err
    assert all(torch.equal(t, want[n]) for n, t in tensors(tmp_path / "again").items())
