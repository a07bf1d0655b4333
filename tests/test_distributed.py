"""nirvana.distributed: every method under FSDP2 on 2 gloo ranks against one process; --device-map; flag errors."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nirvana_kernels
from nirvana import cli
from nirvana.adapters import get_adapter
from nirvana.allocation import allocate
from nirvana.calibration import calibration_windows
from nirvana.distributed import LAUNCH_ENV, layer_partial_scores
from nirvana.methods import get_method
from nirvana.models import load_model
from nirvana.pruning import PruneSettings, prune
from nirvana.saliency import compute_scores
from nirvana.scores import load_scores
from nirvana.sources.gradients import prunable_parameters

from .distributed_worker import (
    ADAM,
    CASES,
    SETTINGS,
    STREAMED,
    STREAMED_CASES,
    compensated_biases,
    fake_gradients,
)
from .helpers import assert_bitwise_equal, assert_close
from .tiny_models import ARCHITECTURES, tiny_batch, tiny_config, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
# Summation order differs between one process and two ranks (gradients and partial scores); the
# observed error is about 2 float32 ulps, this leaves room for a few dozen.
RTOL = 1e-5
# Odd sizes so shards split KV groups (48 q rows, 16 per group, 24 per rank) and the MLP unevenly.
GEOMETRY = dict(hidden_size=30, num_attention_heads=6, num_key_value_heads=3)
MODELS = {"llama": dict(GEOMETRY, intermediate_size=49), "qwen2": dict(GEOMETRY, intermediate_size=47)}
# The rank-local loading case: tied embeddings, and one query head per KV head with an MLP narrower
# than twice the hidden size, so that no rank's shard of any tensor has a full prunable weight's shape
# (which the test checks every created tensor against); split over 3 safetensors shards.
STREAMED_MODEL = dict(
    hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=8, intermediate_size=40,
    tie_word_embeddings=True,
)  # fmt: skip
SHARDS = 3
# Launched under torchrun in one launch, every case for each; qwen2 adds the q/k/v biases (taylor's
# per-window bias terms, Adam's bias second moments).
LAUNCHED = ("llama", "qwen2")


def _save_tiny(folder: Path, arch: str) -> Path:
    path = folder / arch
    tiny_model(arch, **MODELS[arch]).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _save_split(folder: Path, shards: int = SHARDS) -> Path:
    """The tied tiny Llama as ``shards`` safetensors files and their index, tensors dealt round-robin."""
    from safetensors.torch import load_file, save_file

    path = folder / STREAMED
    tiny_model("llama", **STREAMED_MODEL).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names[i::shards]}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names[i::shards], file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index | {"weight_map": weight_map}))
    return path


def _calib_text(path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    words = "the a of to and in that it was her you as had with for she not but be his at on".split()
    picks = torch.randint(0, len(words), (300,), generator=gen).tolist()
    path.write_text(" ".join(words[i] for i in picks), encoding="utf-8")
    return path


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for name in LAUNCH_ENV:
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One torchrun launch of 2 gloo ranks that prunes the tiny models with --distributed fsdp, every case."""
    tmp = tmp_path_factory.mktemp("fsdp")
    folders = {arch: _save_tiny(tmp, arch) for arch in LAUNCHED}
    folders[STREAMED] = _save_split(tmp)
    calib = _calib_text(tmp / "calib.txt")
    out = tmp / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]
    cmd += ["tests/distributed_worker.py", str(out), str(calib), *map(str, folders.values())]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return folders, calib, out


# --------------------------------------------------------------------------------------------------
# Rank-local loading and the streamed checkpoint (the 3-shard folder of the same launch)
# --------------------------------------------------------------------------------------------------


def _streamed(out: Path, case: str) -> list[dict]:
    return [torch.load(out / f"{case}.rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _dense_tensors(folder: Path) -> dict:
    from nirvana.tensorfile import check_folder

    return {name: info for name, (_, info) in check_folder(folder).items()}


@pytest.mark.parametrize("case", list(STREAMED_CASES))
def test_each_rank_read_only_its_own_rows(fsdp_run, case):
    folders, _, out = fsdp_run
    dense = _dense_tensors(folders[STREAMED])
    assert len({p.name for p in folders[STREAMED].glob("*.safetensors")}) == SHARDS
    ranks = _streamed(out, case)
    for r, got in enumerate(ranks):
        reads = got["reads"]
        assert reads["rank"] == r and reads["world_size"] == WORLD
        # Every checkpoint tensor once (the tied lm_head is the embedding), each its torch.chunk rows.
        assert sorted(reads["reads"]) == sorted(dense)
        for name, (start, stop, nbytes) in reads["reads"].items():
            rows = dense[name].shape[0]
            chunk = -(-rows // WORLD)
            assert (start, stop) == (min(r * chunk, rows), min((r + 1) * chunk, rows)), name
            assert nbytes == dense[name].nbytes * (stop - start) // rows, name
    total = sum(info.nbytes for info in dense.values())
    assert sum(got["reads"]["bytes_read"] for got in ranks) == total
    assert ranks[0]["report"]["distributed"]["bytes_read"] == [got["reads"]["bytes_read"] for got in ranks]
    assert ranks[0]["report"]["distributed"]["loading"] == "rank-local"


def test_no_rank_built_a_full_size_prunable_weight_while_loading(fsdp_run):
    folders, _, out = fsdp_run
    model = load_model(folders[STREAMED])[0]
    adapter = get_adapter(model)
    prunable = {
        tuple(linear.weight.shape)
        for lm in adapter.layers(model)
        for linear in (lm.q, lm.k, lm.v, lm.o, lm.gate, lm.up, lm.down)
    }
    local = {(16, 32), (20, 32), (16, 40)}  # the shards of q/k/v/o, gate/up and down on each of 2 ranks
    for case in STREAMED_CASES:
        for r, got in enumerate(_streamed(out, case)):
            shapes = {tuple(s) for s in got["shapes"]}
            assert local <= shapes, f"rank {r}: the recorder missed the shards themselves ({sorted(shapes)})"
            assert not shapes & prunable, f"rank {r} built {sorted(shapes & prunable)}"


def _single_streamed(folders: dict, calib: Path, case: str, out: Path):
    settings = {**SETTINGS, "calib": str(calib), **STREAMED_CASES[case]}
    return prune(PruneSettings(model=str(folders[STREAMED]), device="cpu", out=str(out), **settings), progress=False)


@pytest.mark.parametrize("case", list(STREAMED_CASES))
def test_streamed_plan_and_tensors_equal_the_single_process_flow(fsdp_run, case, tmp_path):
    from safetensors.torch import load_file

    folders, calib, out = fsdp_run
    single = _single_streamed(folders, calib, case, tmp_path / "single")
    plan = json.loads((out / case / "plan.json").read_text())
    assert plan == json.loads((tmp_path / "single" / "plan.json").read_text())
    for r, got in enumerate(_streamed(out, case)):
        assert got["plan"] == plan, f"rank {r}"

    def tensors(folder: Path) -> dict:
        return {k: v for f in sorted(folder.glob("*.safetensors")) if f.name != "scores.safetensors"
                for k, v in load_file(f).items()}  # fmt: skip

    streamed, in_memory = tensors(out / case), tensors(tmp_path / "single")
    assert sorted(streamed) == sorted(in_memory)
    for name, value in in_memory.items():
        if case == "stream-flap" and name.endswith(("o_proj.bias", "down_proj.bias")):
            # FLAP's compensation, from statistics all-reduced in another order: to float rounding.
            assert_close(streamed[name], value, rtol=RTOL, atol=1e-6, name=name)
        else:
            assert_bitwise_equal(streamed[name], value, name=name)
    config = json.loads((out / case / "config.json").read_text())
    expected = json.loads((tmp_path / "single" / "config.json").read_text())
    assert config == expected
    report = json.loads((out / case / "report.json").read_text())
    assert report["params"] == single.report["params"]


def test_streamed_checkpoint_is_byte_identical_to_nirvana_apply_of_its_plan(fsdp_run, tmp_path):
    from nirvana.apply import apply_plan

    folders, _, out = fsdp_run
    applied = apply_plan(out / "stream" / "plan.json", folders[STREAMED], tmp_path / "applied", device="cpu")
    files = sorted(p.name for p in applied.iterdir())
    assert "model.safetensors" in files and "plan.json" in files and "config.json" in files
    for name in files:
        assert (out / "stream" / name).read_bytes() == (applied / name).read_bytes(), name
    # What prune adds besides apply's files.
    extra = {p.name for p in (out / "stream").iterdir()} - set(files)
    assert {"report.json", "scores.safetensors"} <= extra
    scores = load_scores(out / "stream")
    assert scores.meta["distributed"] == {"strategy": "fsdp", "world_size": WORLD}


def test_a_failure_on_rank_0_after_scoring_releases_the_other_ranks(fsdp_run):
    _, _, out = fsdp_run
    raised = [torch.load(out / f"failed.rank{r}.pt")["raised"] for r in range(WORLD)]
    assert raised[0] == "OSError: disk full (simulated)"
    assert all(r is not None and r.startswith("RankZeroFailed: distributed: rank 0 failed") for r in raised[1:])
    assert not (out / "failed").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".failed")]  # no staging folder left


def _single_process_scores(folder: Path, calib: Path):
    model, tokenizer = load_model(folder)
    windows = calibration_windows(
        str(calib), tokenizer, num_samples=SETTINGS["num_samples"], seq_len=SETTINGS["seq_len"], seed=0, model=model
    )
    return model, compute_scores(model, windows, micro_batch_size=SETTINGS["micro_batch_size"], progress=False)


@pytest.mark.parametrize("rows", [4, 5, 1], ids=["divisible", "padded", "fewer-rows-than-ranks"])
def test_each_gradient_is_reduced_into_the_rows_each_rank_holds(fsdp_run, rows):
    out = fsdp_run[2]
    ranks = [torch.load(out / f"reduce_rows.rank{r}.pt")[rows] for r in range(WORLD)]
    total = sum(grad.float() for grad, _, _ in ranks)
    for _, start, local in ranks:
        assert local.dtype == torch.float32
        assert_close(local, total[start : start + local.shape[0]], rtol=0, atol=0, name=f"rows from {start}")
    assert sum(local.shape[0] for _, _, local in ranks) == rows


def test_the_scoring_units_are_every_prunable_linear_and_an_untied_embedding():
    from nirvana.sources.fsdp import scoring_units

    for tie in (False, True):
        model = tiny_model("llama", tie_word_embeddings=tie)
        units = scoring_units(model)
        linears = [m for lm in get_adapter(model).layers(model) for m in lm.linears()]
        assert units[: len(linears)] == linears
        assert units[len(linears) :] == ([] if tie else [model.get_input_embeddings()])


@pytest.mark.parametrize("arch", LAUNCHED)
def test_fsdp_scores_and_plan_match_one_process(fsdp_run, arch):
    folders, calib, out = fsdp_run
    model, single = _single_process_scores(folders[arch], calib)
    saved = load_scores(out / arch)
    assert_close(saved.attention, single.attention, rtol=RTOL, name="attention")
    assert_close(saved.mlp, single.mlp, rtol=RTOL, name="mlp")
    assert saved.meta["distributed"] == {"strategy": "fsdp", "world_size": WORLD}
    assert saved.meta["num_windows"] == single.meta["num_windows"]
    assert saved.meta["objective_value"] == pytest.approx(single.meta["objective_value"], rel=RTOL)

    geometry = get_adapter(model).geometry(model.config)
    expected = allocate(
        single.attention, single.mlp, geometry, sparsity=SETTINGS["sparsity"], gamma=SETTINGS["gamma"],
        round_to=SETTINGS["round_to"], architecture=model.config.architectures[0],
        protect_layers=get_method("nirvana").protect_layers,  # prune's default for NIRVANA
    )  # fmt: skip
    plan = json.loads((out / arch / "plan.json").read_text())
    assert plan["layers"] == expected.to_dict()["layers"]
    report = json.loads((out / arch / "report.json").read_text())
    assert report["distributed"]["world_size"] == WORLD
    assert report["settings"]["distributed"] == "fsdp"


@pytest.mark.parametrize("arch", LAUNCHED)
def test_every_rank_ends_with_the_same_scores_and_plan(fsdp_run, arch):
    _, _, out = fsdp_run
    ranks = [torch.load(out / f"{arch}.nirvana.rank{r}.pt") for r in range(WORLD)]
    saved = load_scores(out / arch)
    for r, got in enumerate(ranks):
        assert_bitwise_equal(got["attention"], saved.attention, name=f"rank {r} attention")
        assert_bitwise_equal(got["mlp"], saved.mlp, name=f"rank {r} mlp")
        assert got["plan"]["layers"] == json.loads((out / arch / "plan.json").read_text())["layers"]


@pytest.mark.parametrize("arch", LAUNCHED)
def test_fsdp_magnitude_scores_match_one_process(fsdp_run, arch):
    folders, _, out = fsdp_run
    expected = compute_scores(load_model(folders[arch])[0], None, saliency="magnitude", progress=False)
    ranks = [torch.load(out / f"{arch}.shards.rank{r}.pt") for r in range(WORLD)]
    for r, got in enumerate(ranks):
        assert_close(got["magnitude_attention"], expected.attention, rtol=RTOL, name=f"rank {r} attention")
        assert_close(got["magnitude_mlp"], expected.mlp, rtol=RTOL, name=f"rank {r} mlp")


def _one_process(folder: Path, calib: Path, overrides: dict):
    """What ``prune`` gives in one process for a case: micro-batch Adam with the global micro-batch."""
    settings = {**SETTINGS, **overrides}
    if settings.get("saliency") == "adam":
        settings["micro_batch_size"] *= WORLD
    return prune(PruneSettings(model=str(folder), calib=str(calib), device="cpu", **settings), progress=False)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", LAUNCHED)
def test_every_method_matches_one_process(fsdp_run, arch, case):
    folders, calib, out = fsdp_run
    single = _one_process(folders[arch], calib, CASES[case])
    ranks = [torch.load(out / f"{arch}.{case}.rank{r}.pt") for r in range(WORLD)]
    got = ranks[0]
    assert_close(got["attention"], single.scores.attention, rtol=RTOL, name="attention")
    assert_close(got["mlp"], single.scores.mlp, rtol=RTOL, name="mlp")
    assert got["meta"]["method"] == single.scores.meta["method"]
    assert got["plan"]["layers"] == single.plan.to_dict()["layers"]
    # --select-calib and --gamma auto: rank 0's KL selection picks what one process picks.
    assert (got["selection"]["seed"], got["selection"]["gamma"]) == (
        single.report["selection"]["seed"],
        single.report["selection"]["gamma"],
    )
    if "kl" in single.report["selection"]:
        assert got["selection"]["kl"] == pytest.approx(single.report["selection"]["kl"], rel=1e-4)
    # FLAP's compensation comes from the all-reduced statistics: the same biases (none for the others).
    expected = compensated_biases(single.model)
    assert sorted(got["biases"]) == sorted(expected)
    compensated = CASES[case].get("method", "nirvana").startswith("flap") or CASES[case].get("compensate") == "bias"
    assert bool(expected) == compensated
    for key, bias in expected.items():
        assert_close(got["biases"][key], bias, rtol=RTOL, name=f"bias {key}")
    for r, other in enumerate(ranks[1:], start=1):
        assert_bitwise_equal(other["attention"], got["attention"], name=f"rank {r} attention")
        assert_bitwise_equal(other["mlp"], got["mlp"], name=f"rank {r} mlp")
        assert other["plan"] == got["plan"]


@pytest.mark.parametrize("arch", LAUNCHED)
def test_micro_batch_adam_is_one_process_with_the_global_micro_batch(fsdp_run, arch):
    folders, calib, out = fsdp_run
    meta = torch.load(out / f"{arch}.adam.rank0.pt")["meta"]
    assert meta["second_moment"] == "micro-batch"
    assert meta["global_micro_batch_size"] == WORLD * SETTINGS["micro_batch_size"]
    # Not the same as one process at the per-rank micro-batch: its second moment averages other gradients.
    # (_one_process doubles the micro-batch for Adam: 1 * WORLD is the per-rank micro-batch, 2.)
    same_size = _one_process(folders[arch], calib, dict(saliency="adam", micro_batch_size=1))
    assert not torch.allclose(torch.load(out / f"{arch}.adam.rank0.pt")["mlp"], same_size.scores.mlp, rtol=1e-3)


@pytest.mark.parametrize("arch", LAUNCHED)
def test_adam_from_an_optimizer_over_the_shards_matches_one_process(fsdp_run, arch):
    folders, calib, out = fsdp_run
    model, tokenizer = load_model(folders[arch])
    optimizer = torch.optim.Adam(model.parameters(), **ADAM)
    fake_gradients(model.parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    windows = calibration_windows(
        str(calib), tokenizer, num_samples=SETTINGS["num_samples"], seq_len=SETTINGS["seq_len"]
    )
    expected = compute_scores(
        model, windows, saliency="adam", optimizer=optimizer, micro_batch_size=SETTINGS["micro_batch_size"],
        progress=False,
    )  # fmt: skip
    for r in range(WORLD):
        got = torch.load(out / f"{arch}.shards.rank{r}.pt")
        assert_close(got["adam_attention"], expected.attention, rtol=RTOL, name=f"rank {r} attention")
        assert_close(got["adam_mlp"], expected.mlp, rtol=RTOL, name=f"rank {r} mlp")
        assert got["adam_meta"]["second_moment"] == "optimizer"
        assert got["adam_meta"]["eps"] == pytest.approx(expected.meta["eps"])


# --------------------------------------------------------------------------------------------------
# Partial sums, with ranks simulated by torch.chunk (no process group)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3, 7], ids=["2-ranks", "3-ranks", "7-ranks-some-empty"])
def test_partial_scores_summed_over_shards_equal_the_whole(world):
    model = tiny_model("qwen2", **MODELS["qwen2"])  # q/k/v biases included
    geometry = get_adapter(model).geometry(model.config)
    layer = get_adapter(model).layers(model)[0]
    attn, mlp = prunable_parameters(layer)
    gen = torch.Generator().manual_seed(1)
    pairs = [(p.detach(), torch.randn(p.shape, generator=gen)) for p in (*attn, *mlp)]

    def shard(r: int, w: torch.Tensor, g: torch.Tensor):
        # torch.chunk is FSDP2's Shard(0) layout; a rank past the last chunk holds no rows.
        chunks_w, chunks_g = torch.chunk(w, world), torch.chunk(g, world)
        start = sum(c.shape[0] for c in chunks_w[:r])
        if r >= len(chunks_w):
            return start, w[:0], g[:0]
        return start, chunks_w[r], chunks_g[r]

    att = torch.zeros(geometry.num_kv_heads)
    channels = torch.zeros(geometry.intermediate_size)
    for r in range(world):
        triples = [shard(r, w, g) for w, g in pairs]
        a, m = layer_partial_scores(geometry, triples[: len(attn)], triples[len(attn) :])
        att += a
        channels += m
    (q, k, v, o, qb, kb, vb), (up, down, gate) = pairs[: len(attn)], pairs[len(attn) :]
    whole_att = nirvana_kernels.attention_group_saliency(
        *q, *k, *v, *o, num_kv_heads=geometry.num_kv_heads, head_dim=geometry.head_dim,
        q_b=qb[0], q_bg=qb[1], k_b=kb[0], k_bg=kb[1], v_b=vb[0], v_bg=vb[1],
    )  # fmt: skip
    whole_mlp = nirvana_kernels.mlp_channel_saliency(*up, *down, gate_w=gate[0], gate_g=gate[1])
    assert_close(att, whole_att, rtol=RTOL, name="attention")
    assert_close(channels, whole_mlp, rtol=RTOL, name="mlp")


def test_partial_adam_scores_summed_over_shards_equal_the_whole():
    # Second moments sharded like their weights (Adam's exp_avg_sq over FSDP2 parameters), biases included.
    world, eps = 3, 1e-3
    model = tiny_model("qwen2", **MODELS["qwen2"])
    geometry = get_adapter(model).geometry(model.config)
    attn, mlp = prunable_parameters(get_adapter(model).layers(model)[0])
    gen = torch.Generator().manual_seed(2)
    full = [
        (p.detach(), torch.randn(p.shape, generator=gen), torch.rand(p.shape, generator=gen)) for p in (*attn, *mlp)
    ]
    att = torch.zeros(geometry.num_kv_heads)
    channels = torch.zeros(geometry.intermediate_size)
    for r in range(world):
        entries = []
        for w, g, v in full:
            rows = [c.shape[0] for c in torch.chunk(w, world)]
            start = sum(rows[:r])
            n = rows[r] if r < len(rows) else 0
            entries.append((start, w[start : start + n], g[start : start + n], v[start : start + n]))
        a, m = layer_partial_scores(geometry, entries[: len(attn)], entries[len(attn) :], eps)
        att += a
        channels += m
    (q, k, v, o, qb, kb, vb), (up, down, gate) = full[: len(attn)], full[len(attn) :]
    whole_att = nirvana_kernels.attention_group_saliency(
        *q[:2], *k[:2], *v[:2], *o[:2], num_kv_heads=geometry.num_kv_heads, head_dim=geometry.head_dim,
        q_b=qb[0], q_bg=qb[1], k_b=kb[0], k_bg=kb[1], v_b=vb[0], v_bg=vb[1],
        exp_avg_sq=tuple(t[2] for t in (q, k, v, o, qb, kb, vb)), eps=eps,
    )  # fmt: skip
    whole_mlp = nirvana_kernels.mlp_channel_saliency(
        *up[:2], *down[:2], gate_w=gate[0], gate_g=gate[1], exp_avg_sq=(up[2], down[2], gate[2]), eps=eps
    )
    assert_close(att, whole_att, rtol=RTOL, name="attention")
    assert_close(channels, whole_mlp, rtol=RTOL, name="mlp")


# --------------------------------------------------------------------------------------------------
# --device-map: one process, the model placed by accelerate
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("devmap"), "llama")


@pytest.mark.parametrize("device_map", ["auto", "cpu", "per-module-hooks"])
def test_device_map_scores_equal_the_plain_model(llama_folder, device_map):
    windows = tiny_batch(3, 10)
    plain, _ = load_model(llama_folder)
    expected = compute_scores(plain, windows, progress=False)
    if device_map == "per-module-hooks":
        from accelerate import dispatch_model

        # One entry per top-level block with forced hooks: accelerate moves activations between
        # "devices" exactly as it would between GPUs, only every device here is the CPU.
        model, _ = load_model(llama_folder)
        names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]
        model = dispatch_model(model, device_map=dict.fromkeys(names, "cpu"), force_hooks=True)
        assert hasattr(model.model.layers[0], "_hf_hook")
    else:
        model, _ = load_model(llama_folder, device_map=device_map)
    got = compute_scores(model, windows, progress=False)
    assert_bitwise_equal(got.attention, expected.attention, name="attention")
    assert_bitwise_equal(got.mlp, expected.mlp, name="mlp")


def test_prune_with_device_map_gives_the_plain_plan(llama_folder, tmp_path):
    calib = _calib_text(tmp_path / "calib.txt")
    common = dict(model=str(llama_folder), calib=str(calib), **SETTINGS)
    placed = prune(PruneSettings(device_map="auto", **common), progress=False)
    plain = prune(PruneSettings(device="cpu", **common), progress=False)
    assert placed.plan.to_dict()["layers"] == plain.plan.to_dict()["layers"]
    assert placed.report["settings"]["device_map"] == "auto"


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_distributed_without_torchrun_is_one_line_exit_2(llama_folder, tmp_path, monkeypatch, capsys):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    argv = ["prune", str(llama_folder), "--sparsity", "0.2", "--distributed", "fsdp", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == cli.EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "torchrun" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_bad_flag_under_torchrun_is_one_line_from_rank_0_only(llama_folder, tmp_path):
    missing = tmp_path / "missing.txt"  # found by PruneSettings.check on every rank, after the launch
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", "-m", "nirvana"]
    cmd += ["prune", str(llama_folder), "--sparsity", "0.2", "--calib", str(missing), "--device", "cpu"]
    cmd += ["--distributed", "fsdp", "--quiet", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    line = f"nirvana: error: calib: {str(missing)!r} does not exist"
    assert proc.returncode != 0
    assert proc.stderr.splitlines().count(line) == 1, proc.stderr
    # The workers wrote torchrun's error files, so its failure summary shows the line, not a link to its docs.
    assert f"traceback : {line}" in proc.stderr, proc.stderr
    # The one traceback left is torchrun's own ChildFailedError (its launcher raises it for any failed
    # worker); no worker printed one.
    assert proc.stderr.count("Traceback (most recent call last)") == 1 and "ChildFailedError" in proc.stderr
    assert "nirvana/" not in "".join(x for x in proc.stderr.splitlines() if x.lstrip().startswith('File "'))
    assert not (tmp_path / "out").exists()


def test_python_dash_m_nirvana_runs_the_cli(monkeypatch, capsys):
    # In-process (runpy) rather than a subprocess: the same __main__ path without seconds of imports.
    monkeypatch.setattr(sys, "argv", ["nirvana", "prune", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("nirvana", run_name="__main__")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--distributed" in out and "--device-map" in out


def test_unknown_distributed_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["prune", "m", "--sparsity", "0.2", "--distributed", "ddp", "--out", "x"])
    assert exc.value.code == cli.EXIT_USAGE
    assert "--distributed" in capsys.readouterr().err


@pytest.fixture
def torchrun_env(monkeypatch):
    for name, value in zip(LAUNCH_ENV, ("0", "2", "0", "localhost", "29500")):
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(distributed="fsdp", saliency="sgd"), "saliency"),
        (dict(distributed="fsdp", device="cuda:1"), "LOCAL_RANK"),
        (dict(distributed="fsdp", device_map="auto"), "device_map"),
        (dict(device_map="auto", device="cpu"), "device_map"),
        (dict(device_map="everywhere"), "device_map"),
    ],
    ids=["unknown-saliency", "cuda-index", "with-device-map", "map-and-device", "unknown-map"],
)
def test_settings_reject_bad_combinations(torchrun_env, overrides, message):
    with pytest.raises(ValueError, match=message):
        PruneSettings(model="smollm2", **overrides).check()


@pytest.mark.parametrize(
    "overrides",
    [dict(method=m) for m in ("magnitude", "random", "taylor", "wanda-sp", "flap")] + [dict(saliency="adam")],
    ids=["magnitude", "random", "taylor", "wanda-sp", "flap", "adam"],
)
def test_settings_accept_every_method(torchrun_env, overrides):
    PruneSettings(model="smollm2", distributed="fsdp", **overrides).check()


def test_a_per_window_method_without_a_sharded_version_is_refused_in_one_line(torchrun_env, monkeypatch):
    from nirvana import distributed

    monkeypatch.setattr(distributed, "PER_WINDOW_SCORERS", {})
    with pytest.raises(ValueError, match="taylor") as err:
        PruneSettings(model="smollm2", distributed="fsdp", method="taylor").check()
    assert "\n" not in str(err.value) and "score it on one process" in str(err.value)


def test_distributed_prune_refuses_a_model_object(torchrun_env):
    with pytest.raises(ValueError, match="model"):
        prune(PruneSettings(model="smollm2", distributed="fsdp"), model=tiny_model("llama"), progress=False)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_0_prints_the_error_and_every_rank_leaves_torchrun_its_error_file(
    torchrun_env, rank, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    argv = ["prune", str(tmp_path / "no-model"), "--sparsity", "0.2", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == cli.EXIT_USAGE
    line = f"nirvana: error: model: {str(tmp_path / 'no-model')!r} does not exist"
    assert capsys.readouterr().err == (f"{line}\n" if rank == "0" else "")
    recorded = json.loads((tmp_path / "error.json").read_text())
    assert recorded["message"]["message"] == line and int(recorded["message"]["extraInfo"]["timestamp"]) > 0


def test_a_rank_variable_alone_does_not_silence_a_plain_run(tmp_path, monkeypatch, capsys):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "3")  # left over from some other launcher: not a torchrun worker
    assert cli.main(["prune", str(tmp_path / "none"), "--sparsity", "0.2", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "source",
    ["model.gguf", "org/some-model"],
    ids=["gguf-file", "hub-name"],
)
def test_a_gguf_or_hub_source_under_distributed_is_refused_in_one_line(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    argv = ["prune", source, "--sparsity", "0.2", "--distributed", "fsdp", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == cli.EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"nirvana convert {source} --out DIR" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_convert_writes_a_safetensors_folder_that_loads_the_same_model(llama_folder, tmp_path, capsys):
    from nirvana.tensorfile import check_folder

    argv = ["convert", str(llama_folder), "--out", str(tmp_path / "conv"), "--max-shard-size", "20KB"]
    assert cli.main(argv) == 0
    assert f"saved to {tmp_path / 'conv'}" in capsys.readouterr().out
    assert (tmp_path / "conv" / "model.safetensors.index.json").is_file()  # sharded at 20KB
    assert len(check_folder(tmp_path / "conv")) == len(check_folder(llama_folder))
    original, converted = load_model(llama_folder)[0], load_model(tmp_path / "conv")[0]
    for (name, a), (_, b) in zip(original.state_dict().items(), converted.state_dict().items()):
        assert_bitwise_equal(b, a, name=name)
    # Never over an existing folder, nor into the source.
    assert cli.main(argv) == cli.EXIT_USAGE
    assert cli.main(["convert", str(llama_folder), "--out", str(llama_folder / "inside")]) == cli.EXIT_USAGE
    assert not (llama_folder / "inside").exists()


# --------------------------------------------------------------------------------------------------
# Rank-local loading's pieces, in one process
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_computed_buffers_equal_the_model_class_own(arch):
    from transformers import AutoModelForCausalLM

    from nirvana.rank_load import computed_buffers

    config = tiny_config(arch)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    built = dict(AutoModelForCausalLM.from_config(config).named_buffers())
    got = computed_buffers(meta)
    assert sorted(got) == sorted(built)
    for name, value in got.items():
        assert_bitwise_equal(value, built[name], name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=["f32", "bf16", "i64"])
def test_read_rows_reads_exactly_the_rows_get_slice_gives(tmp_path, dtype):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nirvana.rank_load import read_rows
    from nirvana.tensorfile import read_header

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "matrix": (torch.randn(7, 5, generator=gen) * 100).to(dtype),
        "vector": (torch.randn(9, generator=gen) * 100).to(dtype),
        "cube": (torch.randn(4, 3, 2, generator=gen) * 100).to(dtype),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    header = read_header(tmp_path / "t.safetensors")
    with safe_open(tmp_path / "t.safetensors", framework="pt") as f:
        for name, t in tensors.items():
            for start, stop in ((0, t.shape[0]), (1, 3), (t.shape[0] - 1, t.shape[0]), (2, 2)):
                got = read_rows(tmp_path / "t.safetensors", header[name], start, stop)
                assert_bitwise_equal(got, f.get_slice(name)[start:stop], name=f"{name}[{start}:{stop}]")
