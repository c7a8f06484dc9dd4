"""`rank`'s parts, exactly and fast: method parsing, pooling, the head, window aggregation, the correlations, the
comparison with a profile and the saved files (each kills mutants `examples/mutation.sh selection/rank` found
surviving)."""
from __future__ import annotations

import csv
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from subcache.errors import BlockError, ConfigError, TrainingError
from test_rank import planted  # noqa: F401  (the fixture)
from subcache.selection import rank as rank_mod
from subcache.selection.rank import (METHODS, RankConfig, RankResult, _check_finite, _per_block, _ranks, compare,
                                     fit_head, kendall, knn_accuracy, parse_methods, pooled, save_rank, spearman,
                                     window_scores)


def test_parse_methods_expands_fisher_keeps_order_and_names_what_is_allowed():
    assert parse_methods("all") == parse_methods(" all ") == METHODS
    assert parse_methods("knn, fisher,knn,") == ("knn", "fisher", "fisher_pp")
    assert parse_methods("rgn") == ("rgn",)
    with pytest.raises(BlockError) as bad:
        parse_methods("magic,knn,wand")
    assert str(bad.value) == f"unknown rank method magic, wand; allowed: {', '.join(METHODS)} or all"
    with pytest.raises(BlockError, match=r"unknown rank method ' , '; allowed"):
        parse_methods(" , ")


def test_rank_result_dict_and_pooling():
    result = RankResult([{"blocks": "2"}], {2: {"knn": 0.5}}, 1.23456, RankConfig(methods=("knn", "rgn")), {"c": 1})
    assert result.to_dict() == {"ranking": [{"blocks": "2"}], "blocks": {"2": {"knn": 0.5}}, "methods": ["knn", "rgn"],
                                "seconds": 1.235, "comparison": {"c": 1}}
    h = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    assert torch.equal(pooled(h), h.mean((2, 3)))
    tokens = h.flatten(2).transpose(1, 2)  # (N, T, C)
    assert torch.equal(pooled(tokens), tokens.mean(1))
    assert torch.equal(pooled(h[:, :, 0, 0]), h[:, :, 0, 0])


def test_knn_votes_leave_one_out_with_ties_to_the_smallest_class():
    x = torch.tensor([[0.0, 1], [0.0, 1.1], [1, 0], [1, 0.1]])
    # each sample's only neighbour (k=1) is its partner; with k larger than N-1 every other sample votes
    assert knn_accuracy(x, torch.tensor([0, 0, 1, 1]), k=1) == 1.0
    assert knn_accuracy(x, torch.tensor([0, 0, 1, 1]), k=50) == 0.0  # 1 vote for its class, 2 for the other
    # k=2: one vote each way, the tie goes to class 0 — right for the class-0 samples only
    assert knn_accuracy(x, torch.tensor([0, 0, 1, 1]), k=2) == 0.5
    # standardised features: a large offset on one feature changes nothing
    assert knn_accuracy(x + torch.tensor([1000.0, 0]), torch.tensor([0, 0, 1, 1]), k=1) == 1.0


def test_fit_head_reads_raw_features_and_refuses_non_finite_ones():
    torch.manual_seed(0)
    y = torch.arange(40) % 2
    f = torch.randn(40, 3) * 0.1 + 500.0
    f[:, 0] += y * 2.0  # the class is in feature 0, far from the origin
    head = fit_head(f, y, 2, l2=1e-3)
    assert (head(f).argmax(1) == y).all() and not head.weight.requires_grad and head.evaluations > 1
    assert head.weight[1, 0] > head.weight[0, 0]
    weak = fit_head(f, y, 2, l2=10.0)  # a strong penalty keeps the weights small
    assert weak.weight.norm() < head.weight.norm()
    f[3, 1] = float("nan")
    with pytest.raises(TrainingError) as bad:
        fit_head(f, y, 2, l2=1e-3)
    assert str(bad.value) == ("rank: the neck features hold non-finite values; the cache's activations may hold "
                              "inf/nan (check with `subcache verify`)")


def _reference_knn(f: np.ndarray, y: np.ndarray, k: int) -> float:
    """Leave-one-out k-NN by hand: standardised features, cosine, majority vote (ties: the smaller class)."""
    z = (f - f.mean(0)) / (f.std(0, ddof=1) + 1e-6)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    right = 0
    for i in range(len(z)):
        sim = z @ z[i]
        sim[i] = -np.inf
        votes = np.bincount(y[np.argsort(-sim, kind="stable")[:min(k, len(z) - 1)]], minlength=y.max() + 1)
        right += int(votes.argmax() == y[i])
    return right / len(z)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_matches_a_loop_by_hand_on_features_of_mixed_scales(seed):
    rng = np.random.default_rng(seed)
    y = np.arange(40) % 3
    f = (rng.normal(size=(40, 5)) + 0.8 * np.eye(5)[y]) * [1, 10, 0.1, 100, 3] + [5, -50, 0, 1000, 2]
    t, ty = torch.from_numpy(f), torch.from_numpy(y)
    for k in (1, 4, 10):
        assert knn_accuracy(t, ty, k) == pytest.approx(_reference_knn(f, y, k)), k
    assert knn_accuracy(t, ty) == knn_accuracy(t, ty, 10)  # ten neighbours by default


GRADS = {1: {"fisher": 1.0, "fisher_pp": 0.1, "rgn": 0.5, "params": 10},
         2: {"fisher": 3.0, "fisher_pp": 0.1, "rgn": 0.25, "params": 30}}
TRANSFER = {1: {"logme": 5.0, "knn": 0.9}, 2: {"logme": 4.0, "knn": 0.7}, 3: {"logme": 1.5, "knn": 0.6}}


def test_window_scores_sum_gradients_and_take_the_transfer_drop():
    got = window_scores((1, 2), GRADS, TRANSFER, ("knn", "rgn", "fisher_pp", "fisher", "logme"))
    assert list(got) == ["knn", "rgn", "fisher_pp", "fisher", "logme"]
    assert got == pytest.approx({"knn": 0.3, "rgn": 0.75, "fisher_pp": 0.1, "fisher": 4.0, "logme": 3.5})
    assert window_scores((2,), GRADS, TRANSFER, ("logme",)) == {"logme": 2.5}
    assert window_scores((2,), {}, TRANSFER, ("knn",)) == pytest.approx({"knn": 0.1})
    sketched = _per_block(GRADS, TRANSFER, SimpleNamespace(drop={1: 0.5, 2: 0.25}), ("drop", "logme"), 1, 2)
    assert sketched == {1: {"drop": 0.5, "logme": 1.0}, 2: {"drop": 0.25, "logme": 2.5}}
    blocks = _per_block(GRADS, TRANSFER, None, ("fisher", "knn"), 1, 2)
    assert list(blocks) == [1, 2] and blocks[1] == pytest.approx({"fisher": 1.0, "knn": 0.2})
    assert blocks[2] == pytest.approx({"fisher": 3.0, "knn": 0.1})


def test_check_finite_names_the_method_and_window():
    _check_finite([{"blocks": "1", "knn": 0.5}], ("knn",))
    with pytest.raises(TrainingError) as bad:
        _check_finite([{"blocks": "1", "knn": 0.5, "rgn": 1.0}, {"blocks": "2-3", "knn": math.inf, "rgn": 1.0},
                       {"blocks": "4", "knn": 0.5, "rgn": math.nan}], ("knn", "rgn"))
    assert str(bad.value).startswith("rank method knn gave a non-finite score for window 2-3; the cache's")


def test_ranks_share_ties_and_correlations_handle_constants():
    assert _ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1, 2, 3], [2, 2, 2]))
    assert kendall([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendall([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(2 * 3))  # tau-b: the tie is not a pair
    assert math.isnan(kendall([1, 2, 3], [5, 5, 5])) and math.isnan(kendall([5, 5], [1, 2]))
    assert kendall([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / math.sqrt(3 * 2))  # a tie in the second list


def _summary(val: bool):
    rows = [("1", 1, 0.60, 0.70), ("2", 1, 0.80, 0.65), ("3", 1, 0.75, 0.90), ("1-2", 2, 0.50, 0.50),
            ("0", 0, 0.99, 0.99)]  # width 0: the head-only run, never a window
    return [{"blocks": b, "width": w, "mean": m, **({"val_mean": v} if val else {})} for b, w, m, v in rows]


@pytest.mark.parametrize("val", [True, False])
def test_compare_correlates_with_the_profile_and_counts_regret(monkeypatch, val):
    monkeypatch.setattr(rank_mod, "load_profile", lambda d: SimpleNamespace(summary=lambda: _summary(val)))
    ranking = [{"blocks": "2", "width": 1, "window": [2], "knn": 0.9, "rgn": 1.0},
               {"blocks": "1", "width": 1, "window": [1], "knn": 0.9, "rgn": 3.0},
               {"blocks": "3", "width": 1, "window": [3], "knn": 0.1, "rgn": 2.0},
               {"blocks": "4", "width": 1, "window": [4], "knn": 5.0, "rgn": 9.0}]  # not in the profile
    out = compare(ranking, ("knn", "rgn"), "prof")
    truth = [0.65, 0.70, 0.90] if val else [0.80, 0.60, 0.75]
    pick = ("3", 0.75) if val else ("2", 0.80)
    assert {k: v for k, v in out.items() if k != "methods"} == {
        "profile": "prof", "windows": 3, "selected_on": "validation" if val else "test", "profile_pick": pick[0],
        "profile_pick_test": pick[1]}
    knn, rgn = out["methods"]["knn"], out["methods"]["rgn"]
    assert knn["top"] == "1" and knn["top_test"] == 0.60  # a tie on the score: the earlier window
    assert knn["regret"] == pytest.approx(100 * (pick[1] - 0.60)) and knn["oracle_regret"] == pytest.approx(20.0)
    assert rgn["top"] == "1" and rgn["spearman"] == pytest.approx(spearman([1.0, 3.0, 2.0], truth))
    assert knn["kendall"] == pytest.approx(kendall([0.9, 0.9, 0.1], truth))
    assert rgn["kendall"] == pytest.approx(kendall([1.0, 3.0, 2.0], truth))
    with pytest.raises(ConfigError, match="prof shares 1 window"):
        compare(ranking[:1], ("knn",), "prof")
    assert compare(ranking[:2], ("knn",), "prof")["windows"] == 2  # two windows are enough to correlate


def test_compare_ties_go_to_the_narrower_window(monkeypatch):
    monkeypatch.setattr(rank_mod, "load_profile", lambda d: SimpleNamespace(summary=lambda: _summary(False)))
    ranking = [{"blocks": "1-2", "width": 2, "window": [1, 2], "knn": 1.0},
               {"blocks": "2", "width": 1, "window": [2], "knn": 1.0}, {"blocks": "3", "width": 1, "window": [3],
                                                                         "knn": 0.0}]
    assert compare(ranking, ("knn",), "p")["methods"]["knn"]["top"] == "2"


def test_save_rank_writes_json_csv_and_plot(tmp_path):
    config = RankConfig(methods=("knn", "fisher"), widths=(1, 2))
    ranking = [{"blocks": "2", "window": [2], "width": 1, "score": 0.5, "knn": 0.5, "fisher": 2.0, "fisher_pp": 0.1},
               {"blocks": "1-2", "window": [1, 2], "width": 2, "score": 0.25, "knn": 0.25, "fisher": 3.0,
                "fisher_pp": 0.05}]
    result = RankResult(ranking, {2: {"knn": 0.5}}, 2.0, config)
    cache = SimpleNamespace(path="c.zarr", backbone={"model": "m"}, layer=4)
    out = tmp_path / "deep" / "rank"
    save_rank(str(out), result, cache)
    meta = json.loads((out / "rank.json").read_text())
    assert meta["cache"] == "c.zarr" and meta["backbone"] == {"model": "m"} and meta["layer"] == 4
    assert meta["config"]["methods"] == ["knn", "fisher"] and meta["config"]["train"]["epochs"] == 10
    assert meta["ranking"] == ranking and meta["blocks"] == {"2": {"knn": 0.5}} and meta["seconds"] == 2.0
    with open(out / "rank.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["blocks", "width", "score", "knn", "fisher", "fisher_pp"], ["2", "1", "0.5", "0.5", "2.0", "0.1"],
                    ["1-2", "2", "0.25", "0.25", "3.0", "0.05"]]
    png = (out / "rank.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    # one 3.2-inch square panel per method (knn, fisher, fisher_pp) at 110 dpi
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1056, 352)
    result.ranking[0]["knn"] = 0.75
    save_rank(str(out), result, cache)  # again into the same folder (a re-run): replaced
    assert json.loads((out / "rank.json").read_text())["ranking"][0]["knn"] == 0.75


def test_pooled_widths_follow_the_blocks(resnet18):
    from subcache.selection.rank import pooled_widths

    assert pooled_widths(resnet18, 2, 5) == [64, 64, 128, 128, 256]  # inputs of blocks 2..5, then 5's output


def test_rank_flops_count_each_methods_passes():
    from subcache.selection.flops import forward_flops, training_flops, window_flops
    from subcache.selection.rank import rank_flops
    from test_rank import planted_backbone

    backbone = planted_backbone()

    def flops(methods, rows, samples=8):
        return rank_flops(backbone, RankResult([], {}, 0.0, RankConfig(methods=methods, samples=samples)), 1, 4, rows)

    # LogME's SVD (4·N·D·min(N, D)) and k-NN's similarities (2·N²·D) at the 5 depths, 3 channels each
    assert flops(("logme",), 10) == 5 * 4 * 10 * 3 * 3 and flops(("logme",), 2) == 5 * 4 * 2 * 3 * 2
    assert flops(("knn",), 10) == 5 * 2 * 100 * 3 and flops(("logme", "knn"), 10) == 1800 + 3000
    step = training_flops(backbone, (1, 2, 3, 4))[1]
    forward = window_flops(forward_flops(backbone), (1, 2, 3, 4))[2]
    assert step > forward > 0
    assert flops(("fisher", "rgn"), 10) == 8 * step and flops(("rgn",), 5) == 5 * step  # min(samples, rows)
    assert flops(("drop",), 10) == 8 * step and flops(("align",), 10) == 8 * (step + forward)
    assert flops(("fisher", "align", "drop"), 100, samples=3) == 3 * (3 * step + forward)
    inner = rank_flops(backbone, RankResult([], {}, 0.0, RankConfig(methods=("align",), samples=2)), 2, 3, 10)
    assert inner == 2 * (training_flops(backbone, (2, 3))[1] + window_flops(forward_flops(backbone), (2, 3))[2])
    assert inner < 2 * (training_flops(backbone, (2, 3, 4))[1] + window_flops(forward_flops(backbone), (2, 3, 4))[2])


def test_rank_stages_compute_only_what_the_methods_ask(planted, monkeypatch, tmp_path):
    import contextlib

    from subcache.train import TrainConfig

    cache, backbone = planted
    said = []

    @contextlib.contextmanager
    def stage(text, enabled=True):
        said.append((text, enabled))
        yield

    monkeypatch.setattr(rank_mod, "stage", stage)
    train = TrainConfig(epochs=1, batch_size=32, device="cpu", limit=100)
    knn = rank_mod.rank_windows(cache, RankConfig(blocks="2-3", methods=("knn", "logme"), train=train),
                                backbone=backbone, progress=True)
    assert said == [("rank: knn, logme at blocks 2-4", True)]  # no head, no gradients for a transfer score
    assert [r["blocks"] for r in knn.ranking] == ["3", "2"] and list(knn.blocks) == [2, 3]
    said.clear()
    config = RankConfig(blocks="2-3", widths=(2, 1), methods=("rgn", "align", "logme"), samples=12, train=train)
    result = rank_mod.rank_windows(cache, config, backbone=backbone, out=str(tmp_path / "r"))
    assert said == [("rank: frozen blocks 2-4 over 100 examples, head", False),
                    ("rank: per-sample gradients of blocks 2-3 on 12 examples", False),
                    ("rank: gradient sketch of blocks 2-3 on 12 examples", False),
                    ("rank: logme at blocks 2-4", False)]
    scores = [r["rgn"] for r in result.ranking]
    assert scores == sorted(scores, reverse=True) and result.ranking[0]["blocks"] == "2-3"  # rgn sums its blocks
    assert all(r["score"] == r["rgn"] and set(r) >= {"rgn", "align", "logme"} for r in result.ranking)
    assert sorted(r["blocks"] for r in result.ranking) == ["2", "2-3", "3"]
    assert json.loads((tmp_path / "r" / "rank.json").read_text())["ranking"] == result.ranking
    for methods, stages in ((("drop",), ["head", "gradient sketch"]), (("fisher",), ["head", "per-sample gradients"])):
        said.clear()
        t0 = time.perf_counter()
        done = rank_mod.rank_windows(cache, RankConfig(blocks="3-3", methods=methods, samples=8, train=train),
                                     backbone=backbone)
        assert 0 < done.seconds <= time.perf_counter() - t0 and list(done.blocks[3]) == list(parse_methods(methods[0]))
        assert [next(k for k in ("head", "per-sample gradients", "gradient sketch", " at blocks") if k in text)
                for text, _ in said] == stages


def test_rank_reads_the_named_label_set_and_the_limit_pool(planted, monkeypatch):
    from subcache.train import TrainConfig, balanced_subset

    cache, backbone = planted
    real, asked = rank_mod.labels_for, []

    def labels_for(c, split, name):
        asked.append((split, name))
        y, n = real(c, split, None)
        return (y % 2, 2) if name == "parity" else (y, n)

    monkeypatch.setattr(rank_mod, "labels_for", labels_for)
    train = TrainConfig(epochs=1, batch_size=32, device="cpu", limit=100, labels="parity")
    rank_mod.rank_windows(cache, RankConfig(blocks="3-3", methods=("rgn",), samples=8, train=train),
                          backbone=backbone)
    assert asked and all(a == ("train", "parity") for a in asked)
    config = RankConfig(train=TrainConfig(limit=100, device="cpu"))
    rows, y = rank_mod._positions(rank_mod.open_for_training(cache, backbone)[0], config, torch.device("cpu"))
    labels = real(rank_mod.open_for_training(cache, backbone)[0], "train", None)[0]
    assert rows.tolist() == balanced_subset(labels.numpy(), 100, 0).tolist()  # the pool profile's split draws from
    assert torch.equal(y, labels[rows])


def test_transfer_scores_use_the_configured_neighbours():
    from subcache.selection.rank import transfer_scores

    torch.manual_seed(0)
    f = torch.randn(30, 4, 2, 2)
    y = torch.arange(30) % 3
    bank = SimpleNamespace(at=lambda split, depth: f * depth)
    rows = torch.arange(30)
    one, many = (transfer_scores(bank, "train", rows, y, 1, 1, ("knn",), k) for k in (1, 25))
    assert one[1]["knn"] == knn_accuracy(pooled(f), y, 1) and many[1]["knn"] == knn_accuracy(pooled(f), y, 25)
    assert one[1]["knn"] != many[1]["knn"] and list(one) == [1, 2] and set(one[2]) == {"knn"}


def test_rank_ties_go_to_the_narrower_then_earlier_window(planted, monkeypatch):
    cache, backbone = planted
    monkeypatch.setattr(rank_mod, "_scores", lambda *a: ({}, {d: {"knn": 0.0} for d in range(1, 6)}, None))
    monkeypatch.setattr(rank_mod, "window_scores", lambda w, *a: {"knn": 1.0 if w == (4,) else 0.5})
    result = rank_mod.rank_windows(cache, RankConfig(blocks="2-4", widths=(2, 1), methods=("knn",)),
                                   backbone=backbone)
    assert [r["blocks"] for r in result.ranking] == ["4", "2", "3", "2-3", "3-4"]


def test_the_rank_plot_has_a_panel_per_method_and_a_line_per_width(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from subcache.selection.rank import plot_rank

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path: saved.append((fig, path)))
    ranking = [{"window": [2], "width": 1, "knn": 0.5, "rgn": 3.0}, {"window": [1], "width": 1, "knn": 0.2, "rgn": 1.0},
               {"window": [1, 2], "width": 2, "knn": 0.9, "rgn": 4.0}]
    plot_rank(RankResult(ranking, {}, 0.0, RankConfig(methods=("knn", "rgn"))), tmp_path / "p.png", ("knn", "rgn"))
    (fig, path), = saved
    assert path == tmp_path / "p.png" and len(fig.axes) == 2
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes] == [(1, 2), (1, 2)]
    for ax, m in zip(fig.axes, ("knn", "rgn")):
        assert ax.get_title() == m and ax.get_xlabel() == "first block"
        lines = [(ln.get_label(), ln.get_xdata().tolist(), ln.get_ydata().tolist(), ln.get_marker()) for ln in
                 ax.get_lines()]
        by_first = sorted((r["window"][0], r[m]) for r in ranking if r["width"] == 1)
        assert lines == [("width 1", [p[0] for p in by_first], [p[1] for p in by_first], "o"),
                         ("width 2", [1], [ranking[2][m]], "o")]
    assert fig.axes[0].get_ylabel() == "score (higher: tune here)" and fig.axes[1].get_ylabel() == ""
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["width 1", "width 2"]
    assert fig.axes[1].get_legend() is None


def test_relative_gradient_norm_divides_by_small_weights_too():
    from subcache.selection.rank import _block_gradient_scores

    params = {"w": torch.full((4,), 0.1)}  # ‖θ‖ = 0.2
    got = _block_gradient_scores(torch.tensor(8.0, dtype=torch.float64), {"w": torch.full((4,), 2.0)}, params, 4)
    assert got == pytest.approx({"fisher": 8.0, "fisher_pp": 2.0, "rgn": 1.0 / 0.2, "params": 4})


def test_fit_head_is_the_penalised_optimum_on_centred_features_scaled_by_one_number():
    torch.manual_seed(1)
    y = torch.arange(60) % 3
    f = torch.randn(60, 4) * torch.tensor([0.3, 0.5, 0.2, 0.4]) + torch.tensor([2.0, -1.0, 0.5, 3.0])
    f[:, 0] += 0.3 * y  # weakly informative: a finite optimum, far from the start
    head = fit_head(f, y, 3, l2=1e-2)
    mean, std = f.mean(0), f.std() + 1e-6
    x = (f - mean) / std
    w = (head.weight * std).clone().requires_grad_(True)  # the head on the standardised features
    b = (head.bias + head.weight @ mean).clone().requires_grad_(True)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 1e-2 * w.square().sum()
        gw, gb = torch.autograd.grad(loss, (w, b))
    assert torch.cat([gw.flatten(), gb]).abs().max() < 1e-4 and w.abs().max() > 0.1
