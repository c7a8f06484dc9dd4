"""Choosing blocks without a full profile: `rank`, `profile --halving`, `--val-fraction`, `build --corrupt`.

The planted backbone: four 1×1-conv blocks on 3 channels, all identity except block 3, then a global average pool.
The label lives only in channel 0 (its brightness: 40 + 60·class); channel 1 is a random level per image, unrelated
to the label; channel 2 is dark. Block 3 turns channel 0 down 10× and drowns it in channel 1's noise (detached: a
fixed corruption, not a path for gradients), and zeroes channel 1. After block 3 the label is barely readable;
before it, perfectly.
Tuning block 3 — and only block 3 — can undo that, so block 3 obviously matters:

* transferability drops across block 3 and nowhere else (identity blocks keep it), so LogME and k-NN rank it first;
* gradient energy: block 3's weights see the clean label channel at full strength, block 4's see the drowned one,
  and blocks 1-2 receive channel 0's gradient through block 3's 0.1 — so Fisher and RGN rank block 3 first.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import subcache
from cli.main import main
from subcache.backbones import Backbone, Preprocess
from subcache.corrupt import corrupt, parse_corruption
from subcache.data import open_source
from subcache.errors import SubcacheError
from subcache.selection import ProfileConfig, halving_profile, profile_blocks, validation_split
from subcache.selection.rank import RankConfig, kendall, knn_accuracy, logme, rank_windows, spearman
from subcache.train import TrainConfig, balanced_subset

EPS = 0.1


class Drown(nn.Module):
    """The planted block: channel 0 ← 0.1·channel 0 + channel 1 (detached), channel 1 ← 0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.diag(torch.tensor([EPS, 0.0, 1.0])).view(3, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.cat([x[:, 1:2].detach(), torch.zeros_like(x[:, 1:])], dim=1)
        return self.conv(x) + noise


def identity_block() -> nn.Module:
    conv = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    return conv


def planted_backbone() -> Backbone:
    blocks = [identity_block(), identity_block(), Drown(), identity_block()]
    pre = Preprocess(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear",
                     crop_pct=1.0)
    neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone.from_modules(nn.Identity(), blocks, neck, pre, model_id="planted")


def planted_npz(path, n_train=240, n_test=80, seed=0) -> str:
    rng = np.random.default_rng(seed)

    def split(n):
        y = np.arange(n) % 4
        x = np.zeros((n, 8, 8, 3), dtype=np.uint8)
        x[..., 0] = (40 + 60 * y)[:, None, None]  # the label
        x[..., 1] = rng.integers(0, 80, (n, 1, 1))  # a level per image
        return x, y

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    backbone = planted_backbone()
    out = str(root / "planted.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=("1",), model="planted", weights="none",
                                              data=planted_npz(root / "planted.npz"), image_size=8,
                                              dtype="float32"), backbone=backbone)
    return out, backbone


FAST = TrainConfig(epochs=2, batch_size=32, lr=1e-2, device="cpu")


# -- rank -----------------------------------------------------------------------------------------------------------
def test_planted_block_ranks_first_by_every_method(planted):
    cache, backbone = planted
    for method in ("fisher", "fisher_pp", "rgn", "logme", "knn"):
        result = rank_windows(cache, RankConfig(methods=(method,), samples=64, train=FAST), backbone=backbone)
        assert result.ranking[0]["blocks"] == "3", (method, [(r["blocks"], r[method]) for r in result.ranking])


def test_rank_scores_are_deterministic_and_finite(planted):
    cache, backbone = planted
    config = RankConfig(widths=(1, 2), samples=48, val_fraction=0.25, train=FAST)
    first = rank_windows(cache, config, backbone=backbone).ranking
    again = rank_windows(cache, config, backbone=backbone).ranking
    assert first == again
    assert len(first) == 4 + 3
    assert all(np.isfinite(r[m]) for r in first for m in config.methods)
    # windows aggregate their blocks: Fisher sums, transfer scores are the drop across the whole window
    by = {r["blocks"]: r for r in first}
    assert by["3-4"]["fisher"] == pytest.approx(by["3"]["fisher"] + by["4"]["fisher"])
    assert by["2-3"]["logme"] == pytest.approx(by["2"]["logme"] + by["3"]["logme"], abs=1e-9)


def test_gradient_scores_match_a_per_sample_autograd_loop():
    from subcache.selection.rank import gradient_scores

    backbone = planted_backbone()
    torch.manual_seed(3)
    head = nn.Linear(3, 4).requires_grad_(False)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    scores = gradient_scores(backbone, head, x, y, 2, 4, chunk=4)
    assert list(scores) == [2, 3, 4]
    for b in (2, 3, 4):
        params = list(backbone.block(b).parameters())
        grads = []
        for i in range(len(x)):
            with torch.enable_grad():
                for p in params:
                    p.requires_grad_(True)
                h = backbone.run_blocks(x[i:i + 1], 2, 4)
                loss = nn.functional.cross_entropy(head(backbone.neck(h)), y[i:i + 1])
                grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
                for p in params:
                    p.requires_grad_(False)
        g = torch.stack(grads).double()
        theta = torch.cat([p.flatten() for p in params]).double()
        assert scores[b]["fisher"] == pytest.approx(g.square().sum(1).mean().item(), rel=1e-5)
        assert scores[b]["fisher_pp"] == pytest.approx(scores[b]["fisher"] / theta.numel())
        assert scores[b]["rgn"] == pytest.approx((g.mean(0).norm() / theta.norm()).item(), rel=1e-5)


def reference_logme(f: np.ndarray, y: np.ndarray) -> float:
    """The published algorithm (thuml/LogME, the D×D eigendecomposition form), transcribed for comparison."""
    f = f.astype(np.float64)
    n, d = f.shape
    v, s, _ = np.linalg.svd(f.T @ f)
    out = []
    for c in range(int(y.max()) + 1):
        t = (y == c).astype(np.float64)
        alpha, beta = 1.0, 1.0
        tmp = v.T @ (f.T @ t)
        for _ in range(11):
            gamma = (beta * s / (alpha + beta * s)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de, beta_de = (m * m).sum(), ((t - f @ m) ** 2).sum()
            new_alpha, new_beta = gamma / (alpha_de + 1e-5), (n - gamma) / (beta_de + 1e-5)
            done = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < 0.01
            alpha, beta = new_alpha, new_beta
            if done:
                break
        ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * s).sum()
              - beta / 2 * beta_de - alpha / 2 * alpha_de - n / 2 * np.log(2 * np.pi))
        out.append(ev / n)
    return float(np.mean(out))


@pytest.mark.parametrize("n, d", [(60, 8), (30, 50)])  # tall and wide features (the SVD's zero eigenvalues)
def test_logme_matches_the_published_algorithm(n, d):
    rng = np.random.default_rng(1)
    y = np.arange(n) % 3
    f = rng.normal(size=(n, d)) + y[:, None] * rng.normal(size=d)
    assert logme(f, y) == pytest.approx(reference_logme(f, y), rel=1e-6)
    assert logme(f, y) > logme(rng.normal(size=(n, d)), y)  # label-bearing features have more evidence


def test_knn_and_rank_correlations():
    x = torch.tensor([[0.0, 1], [0.1, 1], [1, 0], [1, 0.1], [0.05, 1]])
    assert knn_accuracy(x, torch.tensor([0, 0, 1, 1, 0]), k=1) == 1.0
    assert knn_accuracy(x, torch.tensor([1, 0, 1, 0, 1]), k=1) < 0.5
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 12).astype(float), rng.normal(size=12)  # ties in a
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert kendall(a, b) == pytest.approx(stats.kendalltau(a, b).statistic)


def test_profile_flops_count_training_test_passes_build_and_bank(planted):
    from subcache.selection.flops import forward_flops as _forward_flops, profile_flops, training_flops

    _, backbone = planted
    stem, blocks, neck = _forward_flops(backbone)
    wins = [(2,), (3, 4)]
    images, cache = profile_flops(backbone, wins, epochs=3, n_train=10, n_test=4)
    steps = {w: training_flops(backbone, w) for w in wins}
    full = stem + sum(blocks) + neck  # a test pass from images runs the whole network
    tail = {(2,): sum(blocks[1:]) + neck, (3, 4): sum(blocks[2:]) + neck}  # from the window's input on
    assert images == sum(30 * steps[w][0] + 4 * full for w in wins)
    build_and_bank = 14 * (stem + sum(blocks[:2]))  # prefix to block 3's input (the last window's), both splits
    assert cache == build_and_bank + sum(30 * steps[w][1] + 4 * tail[w] for w in wins)


# -- halving --------------------------------------------------------------------------------------------------------
def test_halving_keeps_one_in_eta_and_counts_compute(planted):
    from subcache.selection.flops import training_flops

    cache, backbone = planted
    config = ProfileConfig(widths=(1, 2), halving=True, eta=3, min_epochs=1, train=FAST.__class__(
        **{**FAST.__dict__, "epochs": 3}), val_fraction=0.25)
    result = halving_profile(cache, config, backbone=backbone)
    assert [len(r["windows"]) for r in result.rungs] == [7, 3]  # ⌈7/3⌉ survive rung 0
    assert [r["epochs"] for r in result.rungs] == [1, 3]
    assert result.rungs[0]["kept"] == result.rungs[1]["windows"]
    rung0 = {r["blocks"]: r["val_accuracy"] for r in result.rows if r["rung"] == 0}
    worst_kept = min(rung0[b] for b in result.rungs[0]["kept"])
    assert all(v <= worst_kept for b, v in rung0.items() if b not in result.rungs[0]["kept"])
    flops = {w: training_flops(backbone, w)[1] for w in [(1,), (2,), (3,), (4,), (1, 2), (2, 3), (3, 4)]}
    kept = [tuple(int(b) for b in k.split("-")) for k in result.rungs[0]["kept"]]
    kept = [tuple(range(k[0], k[-1] + 1)) for k in kept]
    by_hand = (1 * sum(flops.values()) + 3 * sum(flops[w] for w in kept)) / (3 * sum(flops.values()))
    assert result.compute_fraction == pytest.approx(by_hand)
    assert result.best["blocks"] == max(result.rungs[1]["windows"], key=lambda b: [
        r["val_accuracy"] for r in result.rows if r["rung"] == 1 and r["blocks"] == b][0])


def test_halving_resumes_after_a_kill(planted, tmp_path):
    cache, backbone = planted
    config = ProfileConfig(widths=(1,), halving=True, eta=2, seeds=1, train=FAST, val_fraction=0.25)
    whole = halving_profile(cache, config, backbone=backbone)

    class Killed(Exception):
        pass

    def kill_after_three(row, seen=[]):
        seen.append(row)
        if len(seen) == 3:
            raise Killed

    with pytest.raises(Killed):
        halving_profile(cache, config, out=str(tmp_path), backbone=backbone, on_run=kill_after_three)
    assert not json.loads((tmp_path / "halving.json").read_text())["complete"]
    trained = []
    resumed = halving_profile(cache, config, out=str(tmp_path), backbone=backbone, on_run=trained.append)
    assert len(trained) == len(whole.rows) - 3
    key = lambda r: (r["rung"], r["blocks"], r["seed"], r["val_accuracy"], r["test_accuracy"])  # noqa: E731
    assert sorted(map(key, resumed.rows)) == sorted(map(key, whole.rows))
    assert resumed.best == whole.best and resumed.compute_fraction == whole.compute_fraction
    again = []  # a finished halving run again: every run read back, nothing trained, the same pick
    rerun = halving_profile(cache, config, out=str(tmp_path), backbone=backbone, on_run=again.append)
    assert again == [] and rerun.best == whole.best and len(rerun.rows) == len(whole.rows)
    with pytest.raises(SubcacheError, match="other settings"):
        halving_profile(cache, ProfileConfig(widths=(1,), halving=True, eta=3, train=FAST, val_fraction=0.25),
                        out=str(tmp_path), backbone=backbone)


def test_halving_prior_rank_starts_from_ranks_best(planted):
    cache, backbone = planted
    config = ProfileConfig(widths=(1,), halving=True, eta=2, prior="rank", train=FAST.__class__(
        **{**FAST.__dict__, "epochs": 1}), val_fraction=0.25)
    result = halving_profile(cache, config, backbone=backbone)
    assert len(result.rungs) == 1 and len(result.rungs[0]["windows"]) == 2 and "3" in result.rungs[0]["windows"]


# -- validation ---------------------------------------------------------------------------------------------------
def test_val_fraction_is_class_balanced_disjoint_and_used_for_selection(planted, monkeypatch):
    cache, backbone = planted
    c = subcache.open_cache(cache)
    y = c.read_y("train").numpy()
    fit, val = validation_split(c, TrainConfig(limit=200), 0.3)
    assert len(val) == 60 and len(fit) == 140 and not set(fit) & set(val)
    assert np.bincount(y[val]).tolist() == [15, 15, 15, 15]
    assert np.array_equal(np.sort(np.concatenate([fit, val])), balanced_subset(y, 200, 0))  # the --limit pool
    seen = []
    import subcache.batched as runs  # a profile's runs train through batched.train_many

    real_train = runs.train
    monkeypatch.setattr(runs, "train", lambda cache, config, data, **kw: seen.append(data.positions) or
                        real_train(cache, config, data, **kw))
    result = profile_blocks(cache, ProfileConfig(blocks="3-4", train=FAST, val_fraction=0.25, probe=False),
                            backbone=backbone)
    assert seen and all(idx is not None and not set(idx) & set(validation_split(c, FAST, 0.25)[1]) for idx in seen)
    summary = result.summary()
    assert all("val_mean" in s for s in summary)
    assert result.best()["blocks"] == max(summary, key=lambda s: s["val_mean"])["blocks"]


def test_greedy_chooses_on_validation_and_trains_without_it(planted, monkeypatch):
    import subcache.selection.greedy as profiling

    cache, backbone = planted
    calls = []
    real_train = profiling.train
    monkeypatch.setattr(profiling, "train", lambda cache, config, data, **kw: calls.append(data) or
                        real_train(cache, config, data, **kw))
    config = profiling.GreedyConfig(blocks="3-4", max_blocks=1, epsilon=-1.0, train=FAST, val_fraction=0.25)
    result = profiling.greedy_select(cache, config, backbone=backbone)
    fit, val = validation_split(subcache.open_cache(cache), FAST, 0.25)
    *search, final = calls
    assert all(np.array_equal(c.eval_positions, val) and np.array_equal(c.positions, fit) for c in search)
    assert np.array_equal(final.positions, fit) and final.eval_positions is None
    assert result.test_accuracy is not None
    with pytest.raises(SubcacheError, match="give one of them"):
        profiling.greedy_select(cache, profiling.GreedyConfig(folds=2, val_fraction=0.2, train=FAST),
                                backbone=backbone)


# -- corrupt --------------------------------------------------------------------------------------------------------
def test_corrupt_is_deterministic_per_item_and_follows_the_parameters(tmp_path):
    from tests.conftest import make_npz

    path = make_npz(tmp_path / "d.npz", n_train=16, n_test=4, size=28, channels=1)
    pre = Preprocess(image_size=28, mean=(0.0,) * 3, std=(1.0,) * 3, interpolation="bilinear", crop_pct=1.0)
    clean = open_source(path, "train").load(0, 16, pre).float()
    noisy = open_source(path, "train", corrupt="gaussian_noise:3")
    whole = noisy.load(0, 16, pre)
    assert torch.equal(whole[5:9], noisy.load(5, 9, pre))  # any batch gives an item the same bits
    assert torch.equal(whole[[3, 1]], noisy.take(np.array([3, 1]), pre))
    inside = (clean > 40) & (clean < 215)  # away from clipping
    assert (whole.float() - clean)[inside].std() / 255 == pytest.approx(0.08, rel=0.15)  # severity 3: σ = 0.08
    low = open_source(path, "train", corrupt="contrast:3").load(0, 16, pre).float()
    mean = clean.mean((2, 3), keepdim=True)
    assert torch.allclose(low, (clean - mean) * 0.4 + mean, atol=1)  # severity 3: contrast × 0.4 about the mean
    assert not torch.equal(open_source(path, "train", corrupt="blur:1").load(0, 16, pre).float(), clean)
    with pytest.raises(SubcacheError, match="severity must be 1 to 5"):
        parse_corruption("gaussian_noise:6")
    assert corrupt(whole[:1], np.array([7]), "gaussian_noise", 3).shape == whole[:1].shape


def test_build_records_the_corruption_and_cli_refuses_bad_specs(tmp_path, npz_path):
    runner = CliRunner()
    bad = runner.invoke(main, ["build", "--model", "resnet18", "--weights", "none", "--data", npz_path, "--layer",
                               "8", "--image-size", "32", "--corrupt", "fog:3", "--out", str(tmp_path / "c.zarr")])
    assert bad.exit_code == 1 and "unknown corruption 'fog'" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "c.zarr").exists()
    out = str(tmp_path / "ok.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=("8",), model="resnet18", weights="none",
                                              data=npz_path, image_size=32, limit=8, corrupt="contrast:2"))
    assert subcache.open_cache(out).attrs["build"]["corrupt"] == "contrast:2"


# -- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_rank_json_against_a_profile(planted, tmp_path, monkeypatch):
    cache, backbone = planted
    monkeypatch.setattr(sys.modules["subcache.train"], "backbone_for", lambda record, *a: backbone)
    profile_blocks(cache, ProfileConfig(widths=(1,), train=FAST, val_fraction=0.25, probe=False),
                   out=str(tmp_path / "profile"), backbone=backbone)
    runner = CliRunner()
    done = runner.invoke(main, ["rank", "--cache", cache, "--method", "knn,fisher", "--samples", "32",
                                "--val-fraction", "0.25", "--against", str(tmp_path / "profile"), "--device", "cpu",
                                "--out", str(tmp_path / "rank"), "--json"])
    assert done.exit_code == 0, done.output
    d = json.loads(done.stdout)
    scores = [r["score"] for r in d["ranking"]]
    assert scores == sorted(scores, reverse=True) and d["ranking"][0]["blocks"] == "3"
    assert set(d["comparison"]["methods"]) == {"knn", "fisher", "fisher_pp"}
    assert all((tmp_path / "rank" / f).is_file() for f in ("rank.csv", "rank.json", "rank.png"))
    bad = runner.invoke(main, ["rank", "--cache", cache, "--method", "magic", "--out", str(tmp_path / "r2")])
    assert bad.exit_code == 1 and "unknown rank method magic" in bad.output
