import importlib
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

import subcache
from subcache.active import ALConfig, active_learning, most_uncertain, uncertainty
from subcache.errors import ConfigError, DataError


def test_scores_on_hand_made_logits():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    logits = probs.log()
    margin, unc = uncertainty(logits, "margin")
    torch.testing.assert_close(margin, torch.tensor([0.5, 0.05, 0.0]), atol=1e-6, rtol=0)
    assert unc.argmax() == 2 and unc.argmin() == 0
    entropy, _ = uncertainty(logits, "entropy")
    torch.testing.assert_close(entropy[2], torch.log(torch.tensor(3.0)), atol=1e-6, rtol=0)
    assert entropy[0] < entropy[1] < entropy[2]
    lc, _ = uncertainty(logits, "least-confidence")
    torch.testing.assert_close(lc, torch.tensor([0.3, 0.6, 2 / 3]), atol=1e-6, rtol=0)


def test_selection_never_repeats_picks_the_budget_and_breaks_ties_by_position():
    values = np.array([0.9, 0.5, 0.9, 0.1, 0.9, 0.7])
    pool = np.array([0, 2, 3, 4, 5])  # position 1 already labelled
    assert most_uncertain(values, pool, 2).tolist() == [0, 2]  # three-way tie at 0.9: smallest positions first
    assert most_uncertain(values, pool, 4).tolist() == [0, 2, 4, 5]
    assert 1 not in most_uncertain(values, pool, 5)
    with pytest.raises(DataError, match="only 5 remain"):
        most_uncertain(values, pool, 6)


def independent_margins(model, x):
    """top-1 minus top-2 softmax probability, computed here from a plain eval-mode forward."""
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(x).double(), dim=1)
    top2 = p.sort(dim=1, descending=True).values[:, :2]
    return (top2[:, 0] - top2[:, 1]).numpy()


def test_each_round_adds_the_lowest_margin_items(resnet_cache, resnet18, tmp_path, monkeypatch):
    active = importlib.import_module("subcache.active")
    rounds, real_train = [], active.train

    def recording(*args, **kwargs):
        result = real_train(*args, **kwargs)
        rounds.append((np.array(args[2].positions), result.model))
        return result

    monkeypatch.setattr(active, "train", recording)
    config = ALConfig(blocks="8", budgets=(20, 50), strategy="margin",
                      train=subcache.TrainConfig(epochs=2, batch_size=16))
    active_learning(resnet_cache, config, out=str(tmp_path / "a"), backbone=resnet18)
    (first, model), (second, _) = rounds
    added = np.setdiff1d(second, first)
    assert len(first) == 20 and len(second) == 50 and len(added) == 30
    x = subcache.open_cache(resnet_cache).read_x("train").float()
    margin = independent_margins(model, x)
    pool = np.setdiff1d(np.arange(192), first)
    cut = np.sort(margin[pool])[29]  # the 30th smallest margin in the pool
    rest = np.setdiff1d(pool, added)
    assert margin[added].max() <= cut + 1e-5 and margin[rest].min() >= cut - 1e-5
    assert margin[added].mean() < margin[rest].mean() - 0.01  # a real gap, not a tie


def test_active_learning_rounds_and_resume_after_a_kill(resnet_cache, resnet18, tmp_path):
    config = ALConfig(blocks="8", budgets=(20, 40, 60), strategy="margin",
                      train=subcache.TrainConfig(epochs=2, batch_size=16))
    result = active_learning(resnet_cache, config, out=str(tmp_path / "a"), backbone=resnet18)
    assert [c["budget"] for c in result.curve] == [20, 40, 60]
    state = json.loads((tmp_path / "a" / "state.json").read_text())
    labelled = state["seeds"]["0"]["labelled"]
    assert len(labelled) == 60 == len(set(labelled))
    # a run killed during its second round (after round one's state was saved) resumes at round two
    import subcache.active as active

    calls, real_train = [0], active.train

    def dies_in_round_two(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    active.train = dies_in_round_two
    try:
        with pytest.raises(KeyboardInterrupt):
            active_learning(resnet_cache, config, out=str(tmp_path / "b"), backbone=resnet18)
    finally:
        active.train = real_train
    assert len(json.loads((tmp_path / "b" / "state.json").read_text())["seeds"]["0"]["curve"]) == 1
    trained = []
    active.train = lambda *a, **k: trained.append(1) or real_train(*a, **k)
    try:
        resumed = active_learning(resnet_cache, config, out=str(tmp_path / "b"), backbone=resnet18)
    finally:
        active.train = real_train
    assert len(trained) == 2  # rounds two and three only
    assert resumed.curve == result.curve
    final = json.loads((tmp_path / "b" / "state.json").read_text())["seeds"]["0"]["labelled"]
    assert final == labelled
    # the same run spelt another way (`layer4.1` is block 8) resumes as finished; other blocks are refused by name
    active.train = lambda *a, **k: trained.append(1) or real_train(*a, **k)
    try:
        again = active_learning(resnet_cache, replace(config, blocks="layer4.1"), out=str(tmp_path / "a"),
                                backbone=resnet18)
    finally:
        active.train = real_train
    assert again.curve == result.curve and len(trained) == 2  # nothing retrained
    state = json.loads((tmp_path / "a" / "state.json").read_text())  # as an earlier version recorded it:
    state["config"]["blocks"], state["config"]["train"]["precision"] = "8", "auto"  # blocks as spelt, `auto`
    (tmp_path / "a" / "state.json").write_text(json.dumps(state))
    assert active_learning(resnet_cache, config, out=str(tmp_path / "a"), backbone=resnet18).curve == result.curve
    with pytest.raises(ConfigError, match=r"other settings \(blocks differ\); use another --out"):
        active_learning(resnet_cache, replace(config, blocks="7"), out=str(tmp_path / "a"), backbone=resnet18)


def test_random_strategy_and_bad_budgets(resnet_cache, resnet18, tmp_path):
    config = ALConfig(blocks="none", budgets=(10, 30), strategy="random",
                      train=subcache.TrainConfig(epochs=1, batch_size=16))
    result = active_learning(resnet_cache, config, out=str(tmp_path / "r"), backbone=resnet18)
    assert [c["budget"] for c in result.curve] == [10, 30]
    for budgets in ((10, 5), (1, 10), (10, 10_000)):
        with pytest.raises(DataError, match="budget"):
            active_learning(resnet_cache, ALConfig(blocks="none", budgets=budgets), out=str(tmp_path / "x"),
                            backbone=resnet18)


def test_oracle_workflow_stops_for_labels_and_resumes_and_trains_on_its_answers(resnet_cache, resnet18, tmp_path,
                                                                                 monkeypatch):
    oracle = tmp_path / "oracle.csv"
    config = ALConfig(blocks="none", budgets=(10, 20), oracle=str(oracle),
                      train=subcache.TrainConfig(epochs=1, batch_size=8))
    out = tmp_path / "o"
    first = active_learning(resnet_cache, config, out=str(out), backbone=resnet18)
    assert first.waiting and first.curve == []
    truth = subcache.open_cache(resnet_cache).read_y("train")
    answer = {i: (int(c) + 1) % 4 for i, c in enumerate(truth)}  # the person disagrees with the cache everywhere
    train_module, active = importlib.import_module("subcache.train"), importlib.import_module("subcache.active")
    real_fit, real_train, seen, given = train_module.Run.fit, active.train, [], []

    def fit_spy(run, *args, **kwargs):  # the labels training actually consumes
        seen.append(sorted(torch.cat([y for _, _, y in run.loader.epoch(0)]).tolist()))
        return real_fit(run, *args, **kwargs)

    def train_spy(*args, **kwargs):  # the labels active learning hands to training, item by item
        given.append({int(i): int(args[2].labels[i]) for i in args[2].positions})
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_module.Run, "fit", fit_spy)
    monkeypatch.setattr(active, "train", train_spy)
    for _ in range(3):
        asked = [line.split(",")[0] for line in open(out / "to_label.csv").read().splitlines()[1:]]
        rows = [] if not oracle.is_file() else oracle.read_text().splitlines()[1:]
        oracle.write_text("id,label\n" + "\n".join(rows + [f"{i},{answer[int(i)]}" for i in asked]) + "\n")
        result = active_learning(resnet_cache, config, out=str(out), backbone=resnet18)
        if not result.waiting:
            break
    assert [c["budget"] for c in result.curve] == [10, 20]
    assert [len(g) for g in given] == [10, 20] and len(seen) == 2
    for labels, consumed in zip(given, seen):
        assert labels == {i: answer[i] for i in labels}  # the oracle's answers, never the cache's y
        assert consumed == sorted(labels.values())


def test_label_sets_serve_another_task(resnet_cache, resnet18, tmp_path):
    cache = subcache.open_cache(resnet_cache)
    ids, y = cache.split("train").id[:], cache.read_y("train").numpy()
    path = tmp_path / "labels.csv"
    path.write_text("id,label\n" + "".join(f"{i},{'top' if c < 2 else 'bottom'}\n" for i, c in zip(ids, y)))
    copy = tmp_path / "c.zarr"
    shutil.copytree(resnet_cache, copy)
    info = subcache.add_labels(str(copy), "half", str(path))
    assert info["classes"] == ["bottom", "top"]
    test_ids, test_y = cache.split("test").id[:], cache.read_y("test").numpy()
    (tmp_path / "t.csv").write_text("id,label\n" + "".join(f"{i},{'top' if c < 2 else 'bottom'}\n"
                                                           for i, c in zip(test_ids, test_y)))
    subcache.add_labels(str(copy), "half", str(tmp_path / "t.csv"), split="test")
    result = subcache.train(str(copy), subcache.TrainConfig(blocks="8", epochs=4, batch_size=32, labels="half"),
                            backbone=resnet18, out=str(tmp_path / "task"))
    assert result.model.head.out_features == 2 and result.test_accuracy > 0.6
    assert subcache.load_task(str(tmp_path / "task")).meta["classes"] == ["bottom", "top"]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\n" + "".join(f"{i + 1000},a\n" for i in ids))
    with pytest.raises(DataError, match="not in split train"):
        subcache.add_labels(str(copy), "bad", str(bad))
    bad.write_text("id,label\n" + "".join(f"{i},a\n" for i in ids[:10]))
    with pytest.raises(DataError, match="label every item"):
        subcache.add_labels(str(copy), "bad", str(bad))
    with pytest.raises(DataError, match="no label set 'nope'"):
        subcache.train(str(copy), subcache.TrainConfig(blocks="8", labels="nope"), backbone=resnet18)


def test_score_cli_writes_scores_and_prints_the_most_uncertain(resnet_cache, resnet18, tmp_path):
    from click.testing import CliRunner

    from subcache.cli.main import main

    subcache.train(resnet_cache, subcache.TrainConfig(blocks="8", epochs=1), backbone=resnet18,
                   out=str(tmp_path / "task"))
    (tmp_path / "ex.txt").write_text("0\n1\n2\n")
    r = CliRunner().invoke(main, ["score", "--cache", resnet_cache, "--task", str(tmp_path / "task"), "--top", "4",
                                  "--exclude", str(tmp_path / "ex.txt"), "--out", str(tmp_path / "s.npz"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["items"] == 189 and len(out["top"]) == 4
    saved = np.load(tmp_path / "s.npz")
    assert not set(saved["id"].tolist()) & {0, 1, 2}
    scores = sorted(saved["score"].tolist())
    assert [t["score"] for t in out["top"]] == pytest.approx(scores[:4])
    r = CliRunner().invoke(main, ["al", "--cache", resnet_cache, "--blocks", "none", "--budgets", "20,40",
                                  "--strategy", "margin,random", "--epochs", "1", "--out", str(tmp_path / "al"),
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["curves"]) == {"margin", "random"}
    assert (tmp_path / "al" / "al.png").is_file() and (tmp_path / "al" / "margin" / "curve.csv").is_file()
