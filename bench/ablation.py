#!/usr/bin/env python
"""LoRASC ablation at MiniLM scale: the structure of the paper's Table 1, plus expert frequency.

Model: all-MiniLM-L6-v2 (22.7M parameters) + mean pooling + linear head, LoRA r=8 (lora_alpha 16)
on query/value, AdamW, batch 16, 5 epochs, linear LR decay restarting at every cascade boundary.
Tasks: Rotten Tomatoes critic snippets (binary, split by movie; OOD = VADER movie / Amazon /
tweets / NYT snippets, see ``lorasc_fast.data``) and TREC-6 questions.

Rows, per method family (LoRA; LoRA+ with lora_B at 16× the learning rate; DoRA):
  LoRA      plain adapter, one LR decay over all steps
  +cascade  one expert per epoch, merged at each epoch end, alpha=0 (slow = fast), lambda=0
  ++slow    alpha > 0 (slow EMA), lambda=0
  +++noise  alpha > 0, lambda > 0 (persistent merge noise)

Greedy selection on the validation split, seed 0 only, per (task, family):
  1. lr* = argmax over {1e-4, 5e-4, 1e-3, 5e-3} of plain LoRA;       (4 runs)
  2. +cascade at lr*;  alpha* = argmax over {0.5, 0.6, 0.8} at lr*;    (1 + 3 runs)
  3. lambda* = argmax over {0.1, 1, 10} at (lr*, alpha*);              (3 runs)
  4. the four rows at the selected values, seeds 1..S-1 added.          (4·(S-1) runs)
Ties go to the earlier grid value. Test and OOD numbers are mean ± std over the S seeds.
Expert frequency (RT, LoRA family, lr*, alpha*, lambda*): 2, 5, 25, 125 experts over the same
steps (a boundary every steps/k optimizer steps); 5 experts = once per epoch = +++noise.

Run count with S=3 seeds: 19 per (task, family) → RT × 3 families 57, TREC × LoRA 19,
expert frequency 9 (k=5 reused): 85 runs. With the default 4,000 training items a run is
1,250 optimizer steps plus ≈ 13k evaluation items at batch 512. Measured on an H200 with 8
``--workers`` processes (one CPU core each) sharing it (``results/ablation/results.jsonl``:
every record keeps its own seconds): 21–53 ms a step (median 28; MiniLM at batch 16 in eager
mode is bound by kernel launches), 27–71 s a run (median 44), 62 process-minutes in all
(≈ 8 min of wall time spread over the 8 workers). The CPU costs 0.24 s a step (2 cores):
≈ 5 min a run.

Usage (all work is resumable: every finished run is one line of ``results.jsonl``, and runs
already there are skipped; ``--budget-seconds`` starts no run that would not finish in time):
  python bench/ablation.py prepare                       # CPU: build/ablation_bundle (≈ 47 MiB)
  python bench/ablation.py run --tiny --device cpu       # CPU smoke test (38 runs), ≈ 2-4 min
  python bench/ablation.py run --device cuda --workers 8 --budget-seconds 450 \\
      --resume bench/results/ablation/results.jsonl --out $OUT/ablation
  python bench/ablation.py report --out bench/results/ablation   # tables + plot from the JSONL

The bundle holds the tokenised splits and the checkpoint with fp16 weights (loaded as fp32;
embedding change ≤ 1e-3), so the GPU machine needs neither the data packages nor the
tokenizer, and it fits a 64 MiB transfer. It lives under the git-ignored ``build/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("lorasc_fast") is None:  # run from a source checkout
    sys.path.insert(0, str(ROOT))

BUNDLE = ROOT / "build" / "ablation_bundle"
OUT = ROOT / "bench" / "results" / "ablation"
FAMILIES = {"lora": {}, "loraplus": {"loraplus_ratio": 16.0}, "dora": {"use_dora": True}}
FAMILY_NAMES = {"lora": "LoRA", "loraplus": "LoRA+", "dora": "DoRA"}
ROWS = ("LoRA", "+cascade", "++slow", "+++noise")
RT_EVAL = ("val", "test", "movie", "amazon", "tweets", "nyt")
OOD = ("movie", "amazon", "tweets", "nyt")
TASK_EVAL = {"rt": RT_EVAL, "trec": ("val", "test")}
TASK_NAMES = {"rt": "Rotten Tomatoes", "trec": "TREC-6"}


@dataclasses.dataclass(frozen=True)
class Grid:
    """Everything that defines the experiment: part of every run's identity."""

    lrs: tuple = (1e-4, 5e-4, 1e-3, 5e-3)
    alphas: tuple = (0.5, 0.6, 0.8)
    lambdas: tuple = (0.1, 1.0, 10.0)
    experts: tuple = (2, 5, 25, 125)
    seeds: int = 3
    epochs: int = 5
    batch_size: int = 16
    rank: int = 8
    train_size: int = 4000
    eval_size: int = 0
    pairs: tuple = (("rt", "lora"), ("rt", "loraplus"), ("rt", "dora"), ("trec", "lora"))
    amp: bool = False

    def check(self, n_train: int) -> None:
        """Each expert count must divide the step count of the expert-frequency task (pairs[0])."""
        total = self.epochs * math.ceil(min(n_train, self.train_size or n_train) / self.batch_size)
        bad = [k for k in self.experts if total % k]
        if bad:
            raise SystemExit(f"{self.pairs[0][0]}: {total} steps are not divisible by experts {bad}; pick "
                             f"--train-size so that they are (4000, 8000 or 9600 for the default grid)")

    def setting(self) -> dict:
        """The part of the grid that changes a single run's outcome."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "rank": self.rank,
                "train_size": self.train_size, "eval_size": self.eval_size, "amp": self.amp}


TINY = Grid(lrs=(5e-4, 5e-3), alphas=(0.5,), lambdas=(1.0,), experts=(2, 4), seeds=2, epochs=2,
            train_size=32, eval_size=48)


@dataclasses.dataclass(frozen=True)
class Run:
    task: str
    family: str
    lr: float
    experts: int = 0  # 0: plain LoRA (no cascade)
    alpha: float = 0.0
    lam: float = 0.0
    seed: int = 0

    @property
    def key(self) -> str:
        return (f"{self.task}/{self.family}/lr={self.lr:g}/k={self.experts}/a={self.alpha:g}"
                f"/l={self.lam:g}/s={self.seed}")


# ---------------------------------------------------------------------------- protocol


def _best(runs, done, attr):
    """Value of ``attr`` of the run with the best val accuracy (earlier grid value on ties)."""
    return getattr(max(enumerate(runs), key=lambda ir: (done[ir[1].key]["acc"]["val"], -ir[0]))[1], attr)


def plan(done: dict, grid: Grid):
    """(runs still to do in priority order, selection per (task, family) so far).

    Selection runs (seed 0) come first — they gate the later stages — then the extra seeds.
    """
    critical, replicas, selection = [], [], {}

    def seeds(run):
        return [dataclasses.replace(run, seed=s) for s in range(1, grid.seeds)]

    for task, family in grid.pairs:
        sel = selection[(task, family)] = {"rows": {}}
        lr_runs = [Run(task, family, lr) for lr in grid.lrs]
        critical += lr_runs
        if not all(r.key in done for r in lr_runs):
            continue
        lr = sel["lr"] = _best(lr_runs, done, "lr")
        rows = sel["rows"]
        rows["LoRA"] = Run(task, family, lr)
        rows["+cascade"] = Run(task, family, lr, grid.epochs)
        alpha_runs = [Run(task, family, lr, grid.epochs, a) for a in grid.alphas]
        critical += [rows["+cascade"], *alpha_runs]
        replicas += seeds(rows["LoRA"]) + seeds(rows["+cascade"])
        if not all(r.key in done for r in alpha_runs):
            continue
        alpha = sel["alpha"] = _best(alpha_runs, done, "alpha")
        rows["++slow"] = Run(task, family, lr, grid.epochs, alpha)
        lam_runs = [Run(task, family, lr, grid.epochs, alpha, lam) for lam in grid.lambdas]
        critical += lam_runs
        replicas += seeds(rows["++slow"])
        if not all(r.key in done for r in lam_runs):
            continue
        lam = sel["lambda"] = _best(lam_runs, done, "lam")
        rows["+++noise"] = Run(task, family, lr, grid.epochs, alpha, lam)
        replicas += seeds(rows["+++noise"])
        if (task, family) == grid.pairs[0]:
            sel["experts"] = {k: Run(task, family, lr, k, alpha, lam) for k in grid.experts}
            replicas += [dataclasses.replace(r, seed=s) for r in sel["experts"].values() for s in range(grid.seeds)]
    todo = [r for r in dict.fromkeys(critical + replicas) if r.key not in done]
    return todo, selection


def max_runs(grid: Grid) -> int:
    """Number of distinct runs of the whole protocol."""
    per_pair = len(grid.lrs) + 1 + len(grid.alphas) + len(grid.lambdas) + len(ROWS) * (grid.seeds - 1)
    extra = sum(1 for k in grid.experts if k != grid.epochs) * grid.seeds
    return per_pair * len(grid.pairs) + extra


# ---------------------------------------------------------------------------- the bundle


def prepare(bundle: Path, max_len: int = 64, seed: int = 0) -> Path:
    """Tokenise every split once and store it with an fp16 copy of the checkpoint (CPU, ~20 s)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from lorasc_fast.data import load_rotten_tomatoes, load_trec, load_vader_ood, minilm_path
    from lorasc_fast.train import load_tokenizer

    src = minilm_path()
    tokenizer = load_tokenizer(src)
    rt = load_rotten_tomatoes(seed=seed)
    tasks = {"rt": {**rt, **load_vader_ood(rt)}, "trec": load_trec(seed=seed)}
    data = {"max_len": max_len, "seed": seed, "tasks": {}}
    for task, splits in tasks.items():
        data["tasks"][task] = {"label_names": list(next(iter(splits.values())).label_names), "splits": {}}
        for name, ex in splits.items():
            tok = tokenizer(list(ex.texts), truncation=True, max_length=max_len, padding="max_length",
                            return_tensors="pt")
            data["tasks"][task]["splits"][name] = {
                "input_ids": tok["input_ids"].to(torch.int16),  # vocab 30,522 < 2^15
                "lengths": tok["attention_mask"].sum(1).to(torch.int16),
                "labels": torch.tensor(ex.labels, dtype=torch.int8)}
    model_dir = bundle / "minilm"
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", model_dir / "config.json")
    weights = {k: v.to(torch.float16) for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    torch.save(data, bundle / "data.pt")
    digest = hashlib.sha256((bundle / "data.pt").read_bytes() + (model_dir / "model.safetensors").read_bytes())
    sizes = {t: {s: len(v["labels"]) for s, v in d["splits"].items()} for t, d in data["tasks"].items()}
    (bundle / "manifest.json").write_text(json.dumps({"sha256": digest.hexdigest(), "sizes": sizes}, indent=1))
    return bundle


def _load_bundle(bundle: Path, grid: Grid):
    """{task: {split: Encoded}} from the bundle, train/eval subsets drawn as the grid says."""
    import torch

    from lorasc_fast.train import Encoded

    data = torch.load(bundle / "data.pt", weights_only=True)
    out = {}
    for task, d in data["tasks"].items():
        out[task] = {}
        for name, s in d["splits"].items():
            n = len(s["labels"])
            cap = grid.train_size if name == "train" else grid.eval_size
            idx = torch.arange(n)
            if cap and cap < n:
                idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:cap].sort().values
            lengths = s["lengths"][idx].long()
            width = int(lengths.max())
            mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
            out[task][name] = Encoded(s["input_ids"][idx, :width].long(), mask, s["labels"][idx].long())
        out[task]["num_labels"] = len(d["label_names"])
    return out


# ---------------------------------------------------------------------------- workers

_WORKER = {}


def _init_worker(bundle: str, grid: Grid, device: str):
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _WORKER.update(bundle=Path(bundle), grid=grid, device=device, data=_load_bundle(Path(bundle), grid))


def _train_eval(run: Run) -> dict:
    """One run in a worker: fresh model, fit, accuracy on every eval split of the task."""
    import torch

    from lorasc_fast.train import evaluate, fit, load_classifier

    grid, device, data = _WORKER["grid"], _WORKER["device"], _WORKER["data"][run.task]
    start = time.perf_counter()
    family = FAMILIES[run.family]
    model = load_classifier(data["num_labels"], rank=grid.rank, use_dora=family.get("use_dora", False),
                            seed=run.seed, model_dir=_WORKER["bundle"] / "minilm")
    cascade = dict(experts=run.experts, alpha=run.alpha, noise_lambda=run.lam) if run.experts else {}
    stats = fit(model, data["train"], epochs=grid.epochs, batch_size=grid.batch_size, lr=run.lr, seed=run.seed,
                loraplus_ratio=family.get("loraplus_ratio", 1.0), device=device, amp=grid.amp, **cascade)
    eval_batch = 512 if torch.device(device).type == "cuda" else 64
    acc = {name: evaluate(model, data[name], batch_size=eval_batch, device=device, amp=grid.amp)
           for name in TASK_EVAL[run.task]}
    return {"key": run.key, "run": dataclasses.asdict(run), "setting": grid.setting(), "acc": acc,
            "train_loss": stats["train_loss"], "steps": stats["steps"], "steps_per_expert": stats["steps_per_expert"],
            "train_seconds": round(stats["seconds"], 2), "seconds": round(time.perf_counter() - start, 2),
            "device": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"}


# ---------------------------------------------------------------------------- driver


def _read_jsonl(paths, setting: dict) -> dict:
    done = {}
    for path in paths:
        if Path(path).is_file():
            for line in Path(path).read_text().splitlines():
                rec = json.loads(line)
                if rec.get("setting") == setting:
                    done[rec["key"]] = rec
    return done


def run_all(grid: Grid, *, bundle: Path, out: Path, device: str, workers: int, budget: float,
            resume=()) -> dict:
    """Schedule runs as their dependencies resolve; returns the records of all done runs."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    done = _read_jsonl([jsonl], grid.setting())
    resumed = {k: r for k, r in _read_jsonl(resume, grid.setting()).items() if k not in done}
    with open(jsonl, "a") as f:  # the resumed runs join this folder's file
        f.writelines(json.dumps(r) + "\n" for r in resumed.values())
    done.update(resumed)
    todo, _ = plan(done, grid)
    print(f"{len(done)} runs done, {len(todo)} runnable now, {max_runs(grid)} in the whole protocol; "
          f"{workers} workers on {device}", flush=True)
    inflight, failed, durations = {}, set(), []
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(str(bundle), grid, device)) as pool:
        while True:
            todo, _ = plan(done, grid)
            todo = [r for r in todo if r.key not in failed and r.key not in {x.key for x in inflight.values()}]
            elapsed = time.perf_counter() - t0
            guess = max(durations[-workers:]) * 1.15 if durations else 0.0
            while todo and len(inflight) < workers and elapsed + guess < budget:
                run = todo.pop(0)
                inflight[pool.submit(_train_eval, run)] = run
            if not inflight:
                break
            finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for fut in finished:
                run = inflight.pop(fut)
                try:
                    rec = fut.result()
                except BrokenProcessPool:
                    raise SystemExit(f"a worker died (out of memory, or the bundle failed to load) during {run.key}")
                except Exception:  # report, keep going with the other runs
                    failed.add(run.key)
                    print(f"FAILED {run.key}\n{traceback.format_exc()}", flush=True)
                    continue
                done[rec["key"]] = rec
                durations.append(rec["seconds"])
                with open(jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                a = rec["acc"]
                print(f"[{time.perf_counter() - t0:6.0f}s] {run.key:50s} val {a['val']:.3f} test {a['test']:.3f}"
                      f" ({rec['seconds']:.0f}s)", flush=True)
    left, _ = plan(done, grid)
    print(f"stopped after {time.perf_counter() - t0:.0f}s: {len(done)} runs done, "
          f"{len(left)} runnable left, {len(failed)} failed", flush=True)
    return done


# ---------------------------------------------------------------------------- report


def _stats(recs, metric):
    xs = [100 * (statistics.fmean(r["acc"][n] for n in OOD) if metric == "ood" else r["acc"][metric]) for r in recs]
    if not xs:
        return None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def _fmt(s):
    return "–" if s is None else f"{s[0]:.1f} ± {s[1]:.1f}"


def summarize(done: dict, grid: Grid) -> dict:
    """Rows of every table: mean/std over the seeds that are done."""
    _, selection = plan(done, grid)
    summary = {"grid": dataclasses.asdict(grid), "runs_done": len(done), "tables": {}}
    for (task, family), sel in selection.items():
        rows = []
        for row in ROWS:
            run = sel["rows"].get(row)
            recs = [] if run is None else [done[k] for s in range(grid.seeds)
                                           if (k := dataclasses.replace(run, seed=s).key) in done]
            metrics = TASK_EVAL[task] + (("ood",) if task == "rt" else ())
            rows.append({"row": row, "run": None if run is None else dataclasses.asdict(run),
                         **{m: _stats(recs, m) for m in metrics}})
        summary["tables"][f"{task}/{family}"] = rows
        if "experts" in sel:
            summary["tables"]["experts"] = [
                {"experts": k, **{m: _stats([done[r.key] for s in range(grid.seeds)
                                             if (r := dataclasses.replace(run, seed=s)).key in done], m)
                                  for m in ("val", "test", "ood")},
                 "steps_per_expert": next((done[dataclasses.replace(run, seed=s).key]["steps_per_expert"]
                                           for s in range(grid.seeds) if dataclasses.replace(run, seed=s).key in done),
                                          None)}
                for k, run in sel["experts"].items()]
    return summary


def _markdown(summary: dict, grid: Grid) -> str:
    g = grid
    lines = [f"# LoRASC ablation — MiniLM-L6 (22.7M), LoRA r={g.rank} on query/value",
             "",
             f"{g.epochs} epochs, batch {g.batch_size}, {g.train_size or 'all'} training items; "
             f"accuracy in % (mean ± std over {g.seeds} seeds). Selection on the val split with seed 0: "
             f"lr ∈ {list(g.lrs)} on plain LoRA, then α ∈ {list(g.alphas)} (λ=0), then λ ∈ {list(g.lambdas)}. "
             f"OOD = mean of VADER movie*, Amazon, tweets, NYT (|rating| ≥ 0.5). *movie: RT sentences from "
             "held-out movies with crowd labels (a label-source shift, not a new domain).",
             f"Runs done: {summary['runs_done']} of {max_runs(g)}.", ""]
    for key, rows in summary["tables"].items():
        if key == "experts":
            continue
        task, family = key.split("/")
        cols = ["val", "test"] + (["movie", "amazon", "tweets", "nyt", "ood"] if task == "rt" else [])
        lines += [f"## {TASK_NAMES[task]} — {FAMILY_NAMES[family]}", "",
                  "| row | lr | α | λ | " + " | ".join("OOD mean" if c == "ood" else c for c in cols) + " | seeds |",
                  "|---" * (len(cols) + 5) + "|"]
        for r in rows:
            run = r["run"]
            hp = ["–"] * 3 if run is None else [f"{run['lr']:g}", f"{run['alpha']:g}" if run["experts"] else "–",
                                                f"{run['lam']:g}" if run["experts"] else "–"]
            n = max((r[c][2] for c in cols if r[c]), default=0)
            cells = [r["row"], *hp, *(_fmt(r[c]) for c in cols), str(n)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if "experts" in summary["tables"]:
        lines += ["## Expert frequency — Rotten Tomatoes, LoRA family at the selected lr, α, λ", "",
                  "| experts | steps per expert | val | test | OOD mean | seeds |", "|---|---|---|---|---|---|"]
        for r in summary["tables"]["experts"]:
            n = max((r[c][2] for c in ("val", "test", "ood") if r[c]), default=0)
            lines.append(f"| {r['experts']} | {r['steps_per_expert'] or '–'} | {_fmt(r['val'])} | {_fmt(r['test'])} "
                         f"| {_fmt(r['ood'])} | {n} |")
    return "\n".join(lines) + "\n"


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = summary["tables"]
    panels = [k for k in tables if k.startswith("rt/")], [k for k in tables if k.startswith("trec/")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, keys, metrics, title in (
            (axes[0], panels[0], ("test", "ood"), "Rotten Tomatoes: test (solid) / OOD mean (hatched)"),
            (axes[1], panels[1], ("test",), "TREC-6: test")):
        width = 0.8 / max(len(ROWS), 1)
        for i, row in enumerate(ROWS):
            for j, metric in enumerate(metrics):
                xs, ys, es = [], [], []
                for f, key in enumerate(keys):
                    s = next(r for r in tables[key] if r["row"] == row)[metric]
                    if s:
                        xs.append(f * len(metrics) + j + (i - 1.5) * width)
                        ys.append(s[0])
                        es.append(s[1])
                ax.bar(xs, ys, width, yerr=es, capsize=2, color=f"C{i}", hatch="//" if j else None,
                       label=row if j == 0 else None)
        ax.set_xticks([f * len(metrics) + j for f in range(len(keys)) for j in range(len(metrics))],
                      [f"{FAMILY_NAMES[k.split('/')[1]]}\n{m}" for k in keys for m in metrics], fontsize=8)
        ax.set_xlim(-0.6, max(len(keys) * len(metrics), 1) - 0.4)
        vals = [r[m][0] for k in keys for r in tables[k] for m in metrics if r[m]]
        if vals:
            ax.set_ylim(min(vals) - 5, max(vals) + 3)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax = axes[2]
    for metric, style in (("test", "o-"), ("ood", "s--")):
        pts = [(r["experts"], r[metric]) for r in tables.get("experts", []) if r[metric]]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], [p[1][1] for p in pts], fmt=style,
                        capsize=3, label={"test": "RT test", "ood": "OOD mean"}[metric])
    ax.set_xscale("log")
    ax.set_xticks([r["experts"] for r in tables.get("experts", [])],
                  [str(r["experts"]) for r in tables.get("experts", [])])
    ax.minorticks_off()
    ax.set_xlabel("experts over the same steps")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Expert frequency (LoRA family, selected α, λ)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(done: dict, grid: Grid, out: Path) -> str:
    summary = summarize(done, grid)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = _markdown(summary, grid)
    (out / "table.md").write_text(text)
    _plot(summary, out / "ablation.png")
    return text


# ---------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="tokenise the data and copy the checkpoint into the bundle (CPU)")
    pp.add_argument("--bundle", type=Path, default=BUNDLE)
    pp.add_argument("--max-len", type=int, default=64)
    for name, help_text in (("run", "train/evaluate the protocol's runs, then write the report"),
                            ("report", "rewrite table.md / summary.json / ablation.png from results.jsonl")):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--out", type=Path, default=None, help=f"output folder (default: {OUT.relative_to(ROOT)}; "
                       "build/ablation_tiny with --tiny)")
        q.add_argument("--tiny", action="store_true", help="tiny grid and data: a CPU smoke test")
        q.add_argument("--seeds", type=int, default=None, help="seeds per final row (default: 3)")
        q.add_argument("--train-size", type=int, default=None, help="training items per task (default: 4000; 0 = all)")
        q.add_argument("--amp", action="store_true", help="bf16 autocast")
        q.add_argument("--no-trec", action="store_true", help="skip the TREC-6 task")
        if name == "run":
            q.add_argument("--bundle", type=Path, default=BUNDLE)
            q.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
            q.add_argument("--workers", type=int, default=None,
                           help="concurrent processes (default: 8 on cuda, 1 on cpu)")
            q.add_argument("--budget-seconds", type=float, default=math.inf,
                           help="start no run that would end after this many seconds")
            q.add_argument("--resume", type=Path, nargs="*", default=(), help="earlier results.jsonl files to reuse")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        bundle = prepare(args.bundle, args.max_len)
        print(f"wrote {bundle}: " + (bundle / "manifest.json").read_text())
        return 0
    grid = TINY if args.tiny else Grid()
    changes = {k: v for k, v in (("seeds", args.seeds), ("train_size", args.train_size)) if v is not None}
    if args.amp:
        changes["amp"] = True
    if args.no_trec:
        changes["pairs"] = tuple(pr for pr in grid.pairs if pr[0] != "trec")
    grid = dataclasses.replace(grid, **changes)
    out = args.out or (ROOT / "build" / "ablation_tiny" if args.tiny else OUT)
    if args.cmd == "run":
        if not (args.bundle / "data.pt").is_file():
            print(f"no bundle at {args.bundle}; building it (needs the demo packages)", flush=True)
            prepare(args.bundle)
        sizes = json.loads((args.bundle / "manifest.json").read_text())["sizes"]
        grid.check(sizes[grid.pairs[0][0]]["train"])
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        workers = args.workers or (8 if device.startswith("cuda") else 1)
        done = run_all(grid, bundle=args.bundle, out=out, device=device, workers=workers,
                       budget=args.budget_seconds, resume=args.resume)
    else:
        done = _read_jsonl([out / "results.jsonl"], grid.setting())
    print(report(done, grid, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
