"""``lorasc demo``: plain LoRA vs LoRASC on Rotten Tomatoes, scored in domain and out of domain.

Fine-tunes all-MiniLM-L6-v2 (22M parameters; packaged offline) as a binary sentiment
classifier — masked mean pooling + linear head, LoRA r=8 on ``query``/``value`` — once with
plain LoRA and once with LoRASC at the same rank, learning rate, steps and trainable
parameters. LoRASC's boundary is each epoch end (``LoRASC.step(optimizer)`` + LR restart).
Reports accuracy on the held-out-movie RT test split and on VADER's crowd-rated snippets
(movie, Amazon, tweets; near-neutral items dropped, movie snippets seen in training removed —
see :mod:`lorasc_fast.data`). Writes ``results.json`` and ``accuracy.png`` to ``--out``.

The defaults (2,000 training snippets, 4 epochs, batch 16, max_len 64, 1,000 items drawn
from each eval set) take about five minutes for both methods on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

EVAL_SETS = ("test", "movie", "amazon", "tweets")
METHODS = ("lora", "lorasc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--method", choices=(*METHODS, "both"), default="both")
    parser.add_argument("--epochs", type=int, default=4, help="epochs = LoRASC experts (default: 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    parser.add_argument("--train-size", type=int, default=2000,
                        help="RT training snippets used, of 10,200 (default: 2000; 0 = all)")
    parser.add_argument("--eval-size", type=int, default=1000,
                        help="items drawn from each eval set (default: 1000; 0 = all)")
    parser.add_argument("--alpha", type=float, default=0.8, help="LoRASC slow EMA coefficient (default: 0.8)")
    parser.add_argument("--noise-lambda", type=float, default=1.0, help="LoRASC noise scale λ (default: 1.0)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64, help="tokens per snippet (default: 64)")
    parser.add_argument("--out", default="./lorasc_demo_out", help="output folder (default: ./lorasc_demo_out)")


def _check(args) -> None:
    for name in ("epochs", "batch_size", "rank", "max_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"lorasc demo: --{name.replace('_', '-')} must be >= 1")
    if args.train_size < 0 or args.eval_size < 0 or min(args.seeds) < 0:
        raise SystemExit("lorasc demo: --train-size, --eval-size and --seeds must be >= 0")
    if args.lr <= 0 or not 0 <= args.alpha < 1 or args.noise_lambda < 0:
        raise SystemExit("lorasc demo: need --lr > 0, 0 <= --alpha < 1, --noise-lambda >= 0")


def _load_data(args):
    from .data import load_rotten_tomatoes, load_vader_ood

    rt = load_rotten_tomatoes(seed=0)
    train = rt["train"].subset(args.train_size or None, seed=0)
    sets = {"test": rt["test"], **load_vader_ood(rt, names=EVAL_SETS[1:])}
    sets = {name: data.subset(args.eval_size or None, seed=0) for name, data in sets.items()}
    return train, sets


def _run_one(method, seed, args, train, sets) -> dict:
    """Train one model on the encoded ``train`` set and score it on every encoded eval set."""
    from .train import evaluate, fit, load_classifier

    model = load_classifier(2, rank=args.rank, seed=seed)
    cascade = dict(experts=args.epochs, alpha=args.alpha, noise_lambda=args.noise_lambda) if method == "lorasc" else {}
    stats = fit(model, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                device=args.device, progress=True, desc=f"{method} seed {seed}", **cascade)
    start = time.perf_counter()
    acc = {name: evaluate(model, data, batch_size=64, device=args.device,
                          progress=True, desc=f"eval {name}")
           for name, data in sets.items()}
    return {"method": method, "seed": seed, "accuracy": acc, "train_loss": stats["train_loss"],
            "steps": stats["steps"], "train_seconds": round(stats["seconds"], 1),
            "eval_seconds": round(time.perf_counter() - start, 1)}


def _summary(runs) -> dict:
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        out[method] = {}
        for name in EVAL_SETS:
            xs = [r["accuracy"][name] for r in mine]
            out[method][name] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
    return out


def _plot(summary, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(summary)
    for i, (method, accs) in enumerate(summary.items()):
        xs = [j + (i - (len(summary) - 1) / 2) * width for j in range(len(EVAL_SETS))]
        stds = [accs[n]["std"] for n in EVAL_SETS]
        ax.bar(xs, [accs[n]["mean"] for n in EVAL_SETS], width, yerr=stds if any(stds) else None,
               label={"lora": "LoRA", "lorasc": "LoRASC"}[method], capsize=3)
    lows = [a[n]["mean"] for a in summary.values() for n in EVAL_SETS]
    ax.set_ylim(max(0.0, min(lows) - 0.1), min(1.0, max(lows) + 0.05))
    ax.set_xticks(range(len(EVAL_SETS)), ["RT test\n(in domain)", "VADER movie\n(crowd labels)",
                                          "VADER Amazon\n(OOD)", "VADER tweets\n(OOD)"])
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _check(args)
    from .train import encode, load_tokenizer

    start = time.perf_counter()
    train, sets = _load_data(args)
    methods = METHODS if args.method == "both" else (args.method,)
    print(f"Rotten Tomatoes: {len(train)} training snippets; eval sets: "
          + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    tokenizer = load_tokenizer()
    enc_train = encode(tokenizer, train, args.max_len)
    enc_sets = {name: encode(tokenizer, data, args.max_len) for name, data in sets.items()}
    runs = [_run_one(m, s, args, enc_train, enc_sets) for s in args.seeds for m in methods]
    summary = _summary(runs)

    print(f"\n{'method':8s} {'seed':>4s} " + " ".join(f"{n:>7s}" for n in EVAL_SETS) + "  train_s")
    for r in runs:
        print(f"{r['method']:8s} {r['seed']:4d} " + " ".join(f"{r['accuracy'][n]:7.3f}" for n in EVAL_SETS)
              + f"  {r['train_seconds']:7.1f}")
    if len(args.seeds) > 1:
        for method, accs in summary.items():
            print(f"{method:8s} mean " + " ".join(f"{accs[n]['mean']:7.3f}" for n in EVAL_SETS))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "command"}
    report = {"config": config, "data": {"train": len(train), **{k: len(v) for k, v in sets.items()}},
              "runs": runs, "summary": summary, "seconds": round(time.perf_counter() - start, 1)}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(summary, out / "accuracy.png",
          f"MiniLM-L6 + LoRA r={args.rank}, {len(train)} RT snippets, {args.epochs} epochs, "
          f"{len(args.seeds)} seed(s); LoRASC α={args.alpha}, λ={args.noise_lambda}")
    print(f"\nwrote {out / 'results.json'} and {out / 'accuracy.png'} ({report['seconds']:.0f} s)")
    return 0
