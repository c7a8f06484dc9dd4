"""Block selection, exactly: which windows a profile or a halving trains, with which seeds and epochs, what it keeps,
saves, resumes, counts and draws (each test kills mutants that `examples/mutation.sh selection/...` found surviving).

Training is replaced by a stub with known accuracies per (window, seed, epochs), so every pick is decided in advance
and each test runs in well under a second on the planted cache of test_rank (blocks 1-4)."""
from __future__ import annotations

import json

import pytest
import torch

import subcache
from subcache.errors import BlockError, SubcacheError
from subcache.selection import ProfileConfig, halving_profile, profile_blocks, validation_split
from subcache.selection import halving as halving_mod
from subcache.selection import profile as profile_mod
from subcache.selection.flops import training_flops
from subcache.selection.halving import planned_runs, rung_epochs, run_note
from subcache.train import TrainConfig
from test_rank import planted  # noqa: F401  (the fixture)

TRAIN = TrainConfig(epochs=4, batch_size=32, device="cpu")
VAL = {"none": 0.30, "1": 0.50, "2": 0.90, "3": 0.70, "4": 0.60, "1-2": 0.55, "2-3": 0.80, "3-4": 0.65}


class Stub:
    """run_windows with known results: val = VAL[window] + epochs/100 + seed/1000, test = val - 0.1; records the
    calls as [(window, seed, epochs), ...] per call and the fit positions it was given."""

    def __init__(self, val=VAL):
        self.val, self.calls, self.fits = val, [], []

    def __call__(self, cache, configs, backbone, bank, split, batch_runs="off"):
        self.batch_runs, self.given = batch_runs, (cache, backbone)
        self.calls.append([(c.blocks, c.seed, c.epochs) for c in configs])
        self.fits.append(None if split is None else split[0])
        rows = []
        for c in configs:
            val = self.val[c.blocks] + c.epochs / 100 + c.seed / 1000
            rows.append({"test_accuracy": round(val - 0.1, 6), "trainable_params": 10 * len(c.blocks),
                         "seconds": 0.5, **({} if split is None else {"val_accuracy": round(val, 6)})})
        return rows


@pytest.fixture(scope="module")
def relabelled(planted, tmp_path_factory):
    """A copy of the planted cache with label sets `half` (class // 2) and `zero` (class 0 or not) on both splits:
    (cache, backbone)."""
    import shutil

    root = tmp_path_factory.mktemp("relabelled")
    store = str(shutil.copytree(planted[0], root / "c.zarr"))
    c = subcache.open_cache(store)
    for split in ("train", "test"):
        ids, y = c.split(split).id[:], c.read_y(split).tolist()
        (root / "l.csv").write_text("id,label\n" + "".join(f"{i},{'ab'[k // 2]}\n" for i, k in zip(ids, y)))
        subcache.labels.add_labels(store, "half", root / "l.csv", split)
        (root / "z.csv").write_text("id,label\n" + "".join(f"{i},{'ab'[k > 0]}\n" for i, k in zip(ids, y)))
        subcache.labels.add_labels(store, "zero", root / "z.csv", split)
    return store, planted[1]


@pytest.fixture
def stub(monkeypatch):
    s = Stub()
    monkeypatch.setattr(profile_mod, "run_windows", s)
    monkeypatch.setattr(halving_mod, "run_windows", s)
    return s


# -- profile --------------------------------------------------------------------------------------------------------
def test_profile_trains_the_probe_then_each_width_in_order_every_seed(planted, stub):
    cache, backbone = planted
    seen = []
    result = profile_blocks(cache, ProfileConfig(blocks="2-4", widths=(2, 1, 2), seeds=2, train=TRAIN,
                                                 batch_runs="off"), backbone=backbone, on_run=seen.append)
    trained = [run for call in stub.calls for run in call]
    assert trained == [(b, s, 4) for b in ("none", "2", "3", "4", "2-3", "3-4") for s in (0, 1)]
    assert all(len(call) == 1 for call in stub.calls)  # --batch-runs off: each run alone
    assert seen == result.rows
    assert [(r["blocks"], r["first"], r["width"], r["seed"]) for r in result.rows[:4]] == [
        ("none", 0, 0, 0), ("none", 0, 0, 1), ("2", 2, 1, 0), ("2", 2, 1, 1)]
    assert result.rows[-1]["first"] == 3 and result.rows[-1]["width"] == 2 and result.rows[-1]["test_accuracy"] == \
        pytest.approx(0.65 + 0.04 + 0.001 - 0.1)
    assert result.best()["blocks"] == "2" and result.out is None


def test_profile_batches_a_windows_seeds_up_to_batch_runs_and_skips_the_probe(planted, stub):
    cache, backbone = planted
    profile_blocks(cache, ProfileConfig(blocks="3-4", seeds=3, probe=False, train=TRAIN, batch_runs="2"),
                   backbone=backbone)
    assert [[(b, s) for b, s, _ in call] for call in stub.calls] == [
        [("3", 0), ("3", 1)], [("3", 2)], [("4", 0), ("4", 1)], [("4", 2)]]
    assert stub.batch_runs == "2"  # and each group trains as one batched model


def test_profile_is_silent_by_default_and_writes_a_line_per_run_with_progress(planted, stub, capsys):
    import re

    cache, backbone = planted
    config = ProfileConfig(blocks="3-4", probe=False, train=TRAIN)
    capsys.readouterr()
    profile_blocks(cache, config, backbone=backbone)
    assert capsys.readouterr().err == ""
    profile_blocks(cache, config, backbone=backbone, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["profile 1/2", "profile 2/2"]
    assert "blocks 3 seed 0: test accuracy 0.6400" in lines[0] and "blocks 4 seed 0" in lines[1]
    assert all(re.search(r" (runs/s|s/run)$", line) for line in lines)


def test_profile_with_halving_passes_its_output_progress_and_callback_on(planted, stub, tmp_path, capsys):
    cache, backbone = planted
    seen = []
    capsys.readouterr()
    result = profile_blocks(cache, ProfileConfig(blocks="3-4", halving=True, eta=2, train=TRAIN), out=tmp_path,
                            backbone=backbone, progress=True, on_run=seen.append)
    assert seen == result.rows and (tmp_path / "halving.json").is_file()
    assert capsys.readouterr().err.startswith("halving 1/")


def test_profile_shares_frozen_activations_unless_runs_augment_and_batches_seeds_on_cuda(planted, stub, monkeypatch):
    from subcache.bank import ActivationBank

    cache, backbone = planted
    banks = []
    real = stub.__call__
    monkeypatch.setattr(profile_mod, "run_windows", lambda c, cf, b, bank, *a: banks.append(bank) or real(c, cf, b,
                                                                                                       bank, *a))
    profile_blocks(cache, ProfileConfig(blocks="4-4", probe=False, train=TRAIN), backbone=backbone)
    assert isinstance(banks[-1], ActivationBank)
    flip = TrainConfig(epochs=4, batch_size=32, device="cpu", augment="flip")
    profile_blocks(cache, ProfileConfig(blocks="4-4", probe=False, train=flip), backbone=backbone)
    assert banks[-1] is None  # an augmented run computes its frozen activations itself
    stub.calls.clear()
    monkeypatch.setattr(profile_mod, "resolve_device", lambda d: torch.device("cuda"))  # `auto` batches on CUDA
    profile_blocks(cache, ProfileConfig(blocks="4-4", seeds=3, probe=False, train=TRAIN), backbone=backbone)
    assert [len(call) for call in stub.calls] == [3]


def test_profile_without_a_range_covers_the_cached_layer_to_the_last_block(planted, stub):  # with 1 seed
    cache, backbone = planted
    result = profile_blocks(cache, ProfileConfig(probe=False, train=TRAIN), backbone=backbone)
    assert [r["blocks"] for r in result.rows] == ["1", "2", "3", "4"]


def test_profile_selects_on_the_validation_split_it_was_given(planted, stub):
    cache, backbone = planted
    result = profile_blocks(cache, ProfileConfig(blocks="3-4", probe=False, val_fraction=0.25, train=TRAIN),
                            backbone=backbone)
    fit, _ = validation_split(subcache.open_cache(cache), TRAIN, 0.25)
    assert all((f == fit).all() for f in stub.fits) and len(stub.fits) == 2
    assert all("val_accuracy" in r for r in result.rows)


@pytest.mark.parametrize("seeds", [0, -1])
def test_profile_refuses_fewer_than_one_seed(planted, stub, seeds):
    cache, backbone = planted
    with pytest.raises(BlockError, match=f"--seeds must be at least 1, got {seeds}"):
        profile_blocks(cache, ProfileConfig(seeds=seeds, train=TRAIN), backbone=backbone)
    assert stub.calls == []


def test_profile_with_halving_hands_over_to_successive_halving(planted, stub):
    cache, backbone = planted
    result = profile_blocks(cache, ProfileConfig(blocks="3-4", halving=True, eta=2, train=TRAIN), backbone=backbone)
    assert isinstance(result, halving_mod.HalvingResult) and result.best["blocks"] == "3"


def test_profile_saves_each_run_resumes_and_plots(relabelled, stub, tmp_path, capsys, monkeypatch):
    cache, backbone = relabelled
    plotted = []
    real_plot = profile_mod.plot_profile
    monkeypatch.setattr(profile_mod, "plot_profile", lambda *a, **k: plotted.append(real_plot(*a, **k)))
    train = TrainConfig(epochs=4, batch_size=32, device="cpu", labels="half")
    config = ProfileConfig(blocks="3-4", seeds=2, train=train, batch_runs="off")

    def kill_after_three(row, seen=[]):
        seen.append(row)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_blocks(cache, config, out=tmp_path, backbone=backbone, on_run=kill_after_three)
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert [(r["blocks"], r["seed"]) for r in saved["runs"]] == [("none", 0), ("none", 1), ("3", 0)]
    assert not (tmp_path / "profile.png").exists()
    stub.calls.clear()
    capsys.readouterr()
    result = profile_blocks(cache, config, out=tmp_path, backbone=backbone, progress=True)
    assert [run for call in stub.calls for run in call] == [("3", 1, 4), ("4", 0, 4), ("4", 1, 4)]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["profile 4/6", "profile 5/6", "profile 6/6"]  # 3 done
    assert plotted[0].axes[0].get_ylabel() == "test accuracy (mean ± std over 2 seeds)"
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["runs"] == result.rows and len(result.rows) == 6 and result.out == tmp_path
    c = subcache.open_cache(cache)
    assert (saved["cache"], saved["backbone"], saved["layer"]) == (c.path, c.backbone, c.layer)
    assert saved["config"]["seeds"] == 2 and saved["config"]["train"]["epochs"] == 4
    assert saved["identity"] == subcache.labels.data_identity(c, "half") and saved["identity"]["labels"] == "half"
    assert (tmp_path / "profile.csv").read_text().splitlines()[1].startswith("none,0,0,0,")
    assert (tmp_path / "profile.png").stat().st_size > 0
    with pytest.raises(SubcacheError, match="other settings"):
        profile_blocks(cache, ProfileConfig(blocks="3-4", seeds=2, train=train, val_fraction=0.25), out=tmp_path,
                       backbone=backbone)
    with pytest.raises(SubcacheError, match="labels"):  # the same settings on other labels
        profile_blocks(cache, ProfileConfig(blocks="3-4", seeds=2, train=TRAIN), out=tmp_path, backbone=backbone)


def test_profile_resumes_only_from_the_same_cache_and_validation_fraction(planted, relabelled, stub, tmp_path):
    config = ProfileConfig(blocks="4-4", probe=False, train=TRAIN, val_fraction=0.25)
    profile_blocks(planted[0], config, out=tmp_path, backbone=planted[1])
    stub.calls.clear()
    assert len(profile_blocks(planted[0], config, out=tmp_path, backbone=planted[1]).rows) == 1
    assert not any(stub.calls)  # the same fraction: read back
    with pytest.raises(SubcacheError, match="cache"):  # a copy of the cache: another cache, the same settings
        profile_blocks(relabelled[0], config, out=tmp_path, backbone=planted[1])


def test_profile_plot_shows_each_width_the_probe_band_and_the_best_window(planted):
    cache, backbone = planted
    rows = [{"blocks": b, "first": f, "width": w, "seed": s, "test_accuracy": a, "trainable_params": 1}
            for b, f, w, accs in [("none", 0, 0, (0.4, 0.6)), ("3", 3, 1, (0.7, 0.9)), ("4", 4, 1, (0.5, 0.7)),
                                  ("3-4", 3, 2, (0.5, 0.7))]
            for s, a in enumerate(accs)]
    c = subcache.open_cache(cache)
    fig = profile_mod.plot_profile(subcache.selection.ProfileResult(rows), None, c, ProfileConfig(seeds=2))
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["1 block", "2 blocks", "linear probe (± std)", "best: blocks 3 (0.800)"]
    one = ax.get_lines()[0]
    assert list(one.get_xdata()) == [3, 4] and list(one.get_ydata()) == pytest.approx([0.8, 0.6])
    probe = next(a for a in ax.get_children() if a.get_gid() == "probe")
    assert probe.get_ydata()[0] == pytest.approx(0.5)
    band = next(a for a in ax.get_children() if a.get_gid() == "probe-band")
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((0.5 - 0.1414, 0.5 + 0.1414), abs=1e-3)
    bands = [a for a in ax.collections if a.get_gid() is None]  # the widths' mean ± std bands
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert (min(ys), max(ys)) == pytest.approx((0.6 - 0.1414, 0.8 + 0.1414), abs=1e-3)  # 0.8 ± 0.14, 0.6 ± 0.14
    star = next(a for a in ax.get_lines() if a.get_gid() == "best-window")
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (3, pytest.approx(0.8))
    assert ax.get_ylabel() == "test accuracy (mean ± std over 2 seeds)"
    assert ax.get_xlabel() == "first block of the tuned window"
    assert ax.get_title() == "Finetuning profile: planted, cache at block 1\nplanted.npz, 240 training examples, " \
                             "10 epochs, 2 seeds"
    one_seed = profile_mod.plot_profile(subcache.selection.ProfileResult(rows[2:3]), None, c, ProfileConfig())
    assert one_seed.axes[0].get_ylabel() == "test accuracy (mean ± std over 1 seed)"
    assert all(a.get_gid() not in ("probe", "probe-band") for a in one_seed.axes[0].get_children())


def test_profile_plot_can_be_read_points_bands_probe_and_star_visible(planted, tmp_path):
    """What a reader needs to see: marked points, translucent bands (the lines show through), a gray dashed probe,
    a large star drawn above the lines, whole-number block ticks; written to the path given."""
    from matplotlib.colors import to_rgba

    rows = [{"blocks": b, "first": f, "width": w, "seed": 0, "test_accuracy": a, "trainable_params": 1}
            for b, f, w, a in [("none", 0, 0, 0.5), ("3", 3, 1, 0.8), ("4", 4, 1, 0.6)]]
    c = subcache.open_cache(planted[0])
    fig = profile_mod.plot_profile(subcache.selection.ProfileResult(rows), tmp_path / "p.png", c, ProfileConfig())
    ax = fig.axes[0]
    line, star = ax.get_lines()[0], next(a for a in ax.get_lines() if a.get_gid() == "best-window")
    probe = next(a for a in ax.get_children() if a.get_gid() == "probe")
    probe_band = next(a for a in ax.get_children() if a.get_gid() == "probe-band")
    band = next(a for a in ax.collections if a.get_gid() is None)
    assert line.get_marker() == "o" and star.get_marker() == "*" and star.get_markersize() >= 12
    assert star.get_zorder() > line.get_zorder() and star.get_linestyle() == "None"
    assert star.get_color() == "crimson" and to_rgba(probe.get_color()) == to_rgba("gray")
    assert probe.get_linestyle() == "--" and to_rgba(probe_band.get_facecolor()[:3]) == to_rgba("gray")
    assert 0 < band.get_alpha() < 0.5 and 0 < probe_band.get_alpha() < 0.5
    assert ax.xaxis.get_major_locator()._integer and (tmp_path / "p.png").stat().st_size > 0


# -- halving --------------------------------------------------------------------------------------------------------
def _halving(planted, eta=2, seeds=1, epochs=4, min_epochs=1, **kw):
    cache, backbone = planted
    config = ProfileConfig(halving=True, eta=eta, seeds=seeds, min_epochs=min_epochs,
                           train=TrainConfig(epochs=epochs, batch_size=32, device="cpu"), **kw)
    return config, lambda **more: halving_profile(cache, config, backbone=backbone, **more)


def test_halving_keeps_the_best_ceil_n_over_eta_and_multiplies_epochs_by_eta(planted, stub, capsys):
    import re

    config, run = _halving(planted, eta=2, epochs=4, widths=(1, 2))
    capsys.readouterr()
    result = run(progress=True)
    lines = capsys.readouterr().err.splitlines()  # a line per run, also when a run is under 10 % of them
    assert [line.split(" (")[0] for line in lines] == [f"halving {i}/13" for i in range(1, 14)]
    assert all(re.search(r" (runs/s|s/run)$", line) for line in lines)
    assert [(r["epochs"], r["windows"], r["kept"]) for r in result.rungs] == [
        (1, ["1", "2", "3", "4", "1-2", "2-3", "3-4"], ["2", "2-3", "3", "3-4"]),  # ⌈7/2⌉ = 4, best first
        (2, ["2", "2-3", "3", "3-4"], ["2", "2-3"]),
        (4, ["2", "2-3"], ["2"])]
    assert [run for call in stub.calls for run in call][-2:] == [("2", 0, 4), ("2-3", 0, 4)]
    assert result.best == {"blocks": "2", "width": 1, "epochs": 4, "val_accuracy": pytest.approx(0.94),
                           "test_accuracy": pytest.approx(0.84)}
    assert len(result.rows) == planned_runs(7, 1, config) == 13


def test_halving_with_eta_three_keeps_a_third_and_a_lone_survivor_goes_straight_to_the_end(planted, stub):
    _, run = _halving(planted, eta=3, epochs=9, blocks="1-4")
    result = run()
    assert [(r["epochs"], r["kept"]) for r in result.rungs] == [(1, ["2", "3"]), (3, ["2"]), (9, ["2"])]


def test_halving_ranks_by_mean_validation_over_seeds_ties_to_the_earlier_narrower_window(planted, monkeypatch):
    tie = {**VAL, "1": 0.7, "3": 0.7, "1-2": 0.7, "2": 0.1}
    stub = Stub(tie)
    monkeypatch.setattr(halving_mod, "run_windows", stub)
    _, run = _halving(planted, eta=2, seeds=2, epochs=1, widths=(2, 1), blocks="1-3")
    result = run()
    assert result.rungs[0]["windows"] == ["1", "2", "3", "1-2", "2-3"]
    assert result.rungs[0]["kept"] == ["2-3"]  # 0.8 beats the three-way tie at 0.7
    tie["2-3"] = 0.7
    result = run()
    assert result.rungs[0]["kept"] == ["1"]  # a tie: the narrowest, then the earliest
    assert result.best["val_accuracy"] == pytest.approx(0.7 + 0.01 + 0.0005)  # the mean over seeds 0 and 1
    assert result.best["test_accuracy"] == pytest.approx(0.6 + 0.01 + 0.0005)


def test_halving_counts_training_flops_of_its_runs_against_a_full_profile(planted, stub):
    cache, backbone = planted
    _, run = _halving(planted, eta=2, epochs=4, seeds=2, blocks="2-4", val_fraction=0.25)
    result = run()
    n_fit = len(validation_split(subcache.open_cache(cache), TRAIN, 0.25)[0])
    flops = {w: training_flops(backbone, w)[1] for w in [(2,), (3,), (4,)]}
    assert [r["flops"] for r in result.rows if r["rung"] == 1] == [2 * n_fit * flops[w] for w in [(2,), (2,), (3,), (3,)]]
    spent = 2 * n_fit * (1 * sum(flops.values()) + 2 * (flops[(2,)] + flops[(3,)]) + 4 * flops[(2,)])
    full = 2 * 4 * n_fit * sum(flops.values())
    assert (result.train_flops, result.full_flops) == (spent, full)
    assert result.compute_fraction == spent / full
    d = result.to_dict()
    assert (d["train_flops"], d["full_profile_flops"], d["runs"], d["best"]) == (spent, full, 12, result.best)


def test_halving_validates_on_a_fifth_without_val_fraction(planted, stub):
    cache, _ = planted
    _, run = _halving(planted, blocks="4-4")
    run()
    assert all((f == validation_split(subcache.open_cache(cache), TRAIN, 0.2)[0]).all() for f in stub.fits)


@pytest.mark.parametrize("eta, min_epochs", [(1, 1), (2, 0)])
def test_halving_refuses_eta_below_two_or_no_first_epochs(planted, stub, eta, min_epochs):
    _, run = _halving(planted, eta=eta, min_epochs=min_epochs)
    with pytest.raises(BlockError, match=f"got {eta}, {min_epochs}"):
        run()


def test_halving_first_rung_epochs_capped_at_the_final_epochs(planted, stub):
    _, run = _halving(planted, eta=2, epochs=2, min_epochs=5, blocks="3-4")
    assert [r["epochs"] for r in run().rungs] == [2]


def test_rung_epochs_and_planned_runs():
    assert rung_epochs(1, 9, 3, 2) == 3 and rung_epochs(3, 9, 3, 2) == 9 and rung_epochs(4, 9, 3, 2) == 9
    assert rung_epochs(1, 9, 3, 1) == 9  # a lone survivor goes to the end
    config = ProfileConfig(eta=3, seeds=2, train=TrainConfig(epochs=9))
    assert planned_runs(7, 1, config) == 2 * (7 + 3 + 1)
    assert planned_runs(7, 9, config) == 2 * 7
    assert planned_runs(2, 1, ProfileConfig(eta=2, train=TrainConfig(epochs=8))) == 2 + 1


def test_run_note_is_a_runs_progress_line():
    row = {"rung": 1, "epochs": 3, "blocks": "3-4", "seed": 0, "val_accuracy": 0.8125, "test_accuracy": None}
    assert run_note(row) == "rung 1 (3 epochs) blocks 3-4 seed 0: val 0.8125 test –"


def test_halving_saves_resumes_and_marks_the_file_complete(planted, stub, tmp_path, capsys):
    import re

    _, run = _halving(planted, eta=2, blocks="2-4")
    whole = run()
    def kill_after_two(row, seen=[]):
        seen.append(row)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(out=str(tmp_path), on_run=kill_after_two)
    saved = json.loads((tmp_path / "halving.json").read_text())
    assert saved["complete"] is False and [r["blocks"] for r in saved["runs"]] == ["2", "3"]
    stub.calls.clear()
    capsys.readouterr()
    resumed = run(out=str(tmp_path), progress=True)
    lines = capsys.readouterr().err.splitlines()  # off a terminal: a line per run
    assert [run for call in stub.calls for run in call][0] == ("4", 0, 1)  # rung 0's two saved runs are not retrained
    assert [line.split(" (")[0] for line in lines] == [f"halving {i}/6" for i in range(1, 7)]  # 3 + 2 + 1 planned
    assert ["(saved)" in line for line in lines] == [True, True, False, False, False, False]
    assert "halving 1/6 (17%) rung 0 (1 epochs) blocks 2 seed 0: val 0.9100 test 0.8100 (saved)" in lines[0]
    assert re.fullmatch(r"halving 3/6 \(50%\) rung 0 \(1 epochs\) blocks 4 seed 0: val 0.6100 test 0.5100 "
                        r"[\d.,]+ (runs/s|s/run)", lines[2])
    saved = json.loads((tmp_path / "halving.json").read_text())
    assert saved["complete"] is True and saved["best"] == whole.best == resumed.best
    assert saved["runs"] == resumed.rows and saved["rungs"] == whole.rungs
    assert saved["config"]["eta"] == 2 and saved["layer"] == 1 and saved["backbone"]["model"] == "planted"
    assert saved["compute_fraction"] == pytest.approx(whole.compute_fraction)
    assert (tmp_path / "halving.csv").read_text().splitlines()[0] == ",".join(halving_mod.HALVING_FIELDS)


def test_halving_prior_keeps_ranks_best_windows_in_window_order(planted, stub, monkeypatch):
    ranking = [(2, 3), (4,), (1, 2), (2,), (1,), (3,), (3, 4)]
    seen = []

    def rank_windows(cache, config, backbone=None):
        seen.append(config)
        assert isinstance(cache, subcache.store.Cache) and cache.path == planted[0] and backbone is planted[1]
        return type("R", (), {"ranking": [{"window": list(w)} for w in ranking if len(w) in config.widths]})()

    monkeypatch.setattr(halving_mod, "rank_windows", rank_windows)
    _, run = _halving(planted, eta=3, epochs=1, prior="rank", widths=(1, 2), blocks="1-4")
    assert run().rungs[0]["windows"] == ["4", "1-2", "2-3"]  # ⌈7/3⌉ = 3 of rank's order, trained in window order
    assert (seen[0].blocks, seen[0].widths, seen[0].val_fraction) == ("1-4", (1, 2), 0.2)
    assert seen[0].train == TrainConfig(epochs=1, batch_size=32, device="cpu")
    _, run = _halving(planted, eta=5, epochs=1, prior="rank", widths=(1,))
    assert run().rungs[0]["windows"] == ["4"]  # ⌈4/5⌉ = 1
    _, run = _halving(planted, eta=3, epochs=1, prior="fisher")
    with pytest.raises(BlockError, match="--prior must be rank, got 'fisher'"):
        run()


def test_halving_saves_its_label_sets_identity_and_resumes_only_the_same_settings(planted, relabelled, stub,
                                                                                 tmp_path):
    cache, backbone = relabelled
    half = TrainConfig(epochs=2, batch_size=32, device="cpu", labels="half")
    config = ProfileConfig(blocks="3-4", halving=True, eta=2, train=half)
    halving_profile(cache, config, out=str(tmp_path), backbone=backbone)
    saved = json.loads((tmp_path / "halving.json").read_text())
    assert saved["identity"] == subcache.labels.data_identity(subcache.open_cache(cache), "half")
    stub.calls.clear()
    halving_profile(cache, config, out=str(tmp_path), backbone=backbone)
    assert not any(stub.calls)  # every run read back, none trained
    for other in (ProfileConfig(blocks="3-4", halving=True, eta=2, train=TrainConfig(epochs=2, batch_size=32,
                                                                                     device="cpu")),
                  ProfileConfig(blocks="3-4", halving=True, eta=2, train=half, min_epochs=2),
                  ProfileConfig(blocks="3-4", halving=True, eta=2, train=half, val_fraction=0.3)):
        with pytest.raises(SubcacheError, match="labels|other settings"):
            halving_profile(cache, other, out=str(tmp_path), backbone=backbone)
    assert not any(stub.calls)
    same = ProfileConfig(blocks="3-4", halving=True, eta=2, train=TrainConfig(epochs=2, batch_size=32, device="cpu"))
    halving_profile(planted[0], same, out=str(tmp_path / "p"), backbone=backbone)
    with pytest.raises(SubcacheError, match="cache"):  # a copy of the cache: another cache, the same settings
        halving_profile(cache, same, out=str(tmp_path / "p"), backbone=backbone)


def test_halving_refuses_to_resume_another_range_widths_or_prior(planted, stub, tmp_path, monkeypatch):
    """Its rungs depend on the windows: a folder of another range's halving would hand back runs of another
    schedule (a rung trained for other epochs)."""
    _, run = _halving(planted, eta=2, epochs=4)
    run(out=str(tmp_path))
    for kw in ({"blocks": "3-4"}, {"widths": (1, 2)}, {"prior": "rank"}):
        _, other = _halving(planted, eta=2, epochs=4, **kw)
        with pytest.raises(SubcacheError, match="other settings"):
            other(out=str(tmp_path))
    stub.calls.clear()
    assert len(run(out=str(tmp_path)).rows) == 7 and not any(stub.calls)  # the same halving: all read back


def test_halving_counts_only_the_runs_of_its_own_schedule(planted, stub, tmp_path):
    """A resumed folder may hold runs the schedule no longer makes (a killed run whose rung 0 came out otherwise):
    they are kept in the file but not counted as compute."""
    _, run = _halving(planted, eta=2, epochs=4, blocks="3-4")
    whole = run(out=str(tmp_path))
    assert [r["windows"] for r in whole.rungs] == [["3", "4"], ["3"]]
    saved = json.loads((tmp_path / "halving.json").read_text())
    stale = [{**saved["runs"][0], "rung": 1, "blocks": "4", "first": 4, "flops": 10 ** 12},
             {**saved["runs"][0], "rung": 2, "flops": 10 ** 12}]
    (tmp_path / "halving.json").write_text(json.dumps({**saved, "runs": saved["runs"] + stale}))
    resumed = run(out=str(tmp_path))
    assert len(resumed.rows) == len(whole.rows) + 2 and resumed.train_flops == whole.train_flops
    assert resumed.best == whole.best


def test_halving_shares_frozen_activations_unless_runs_augment_and_passes_batch_runs(planted, stub, monkeypatch):
    from subcache.bank import ActivationBank

    banks = []
    real = stub.__call__
    monkeypatch.setattr(halving_mod, "run_windows", lambda c, cf, b, bank, split, batch_runs: banks.append(
        (bank, batch_runs)) or real(c, cf, b, bank, split, batch_runs))
    _, run = _halving(planted, blocks="4-4", batch_runs="3")
    run()
    assert isinstance(banks[-1][0], ActivationBank) and banks[-1][1] == "3"
    cache, backbone = planted
    flip = TrainConfig(epochs=2, batch_size=32, device="cpu", augment="flip")
    halving_profile(cache, ProfileConfig(blocks="4-4", halving=True, train=flip), backbone=backbone)
    assert banks[-1][0] is None  # an augmented run computes its frozen activations itself


def test_halving_rows_name_their_window_and_it_is_silent_by_default(planted, stub, tmp_path, capsys):
    _, run = _halving(planted, eta=2, epochs=1, widths=(2,), blocks="2-4")
    capsys.readouterr()
    result = run(out=tmp_path)
    assert capsys.readouterr().err == ""
    assert [(r["blocks"], r["first"], r["width"]) for r in result.rows] == [("2-3", 2, 2), ("3-4", 3, 2)]
    assert result.to_dict()["out"] == str(tmp_path) and result.out == str(tmp_path)
    saved = json.loads((tmp_path / "halving.json").read_text())
    assert saved["cache"] == subcache.open_cache(planted[0]).path and saved["out"] == str(tmp_path)
    assert (tmp_path / "halving.csv").read_text().splitlines()[1].startswith("0,1,2-3,2,2,0,")


def test_halving_batches_a_window_s_seeds_on_the_given_cache_and_backbone(planted, stub, monkeypatch):
    banks = []
    real = halving_mod.shared_bank
    monkeypatch.setattr(halving_mod, "shared_bank", lambda c, b, *a: banks.append(b) or real(c, b, *a))
    _, run = _halving(planted, eta=2, seeds=3, epochs=1, widths=(1,), blocks="3-4", batch_runs="2")
    result = run()
    assert [[(b, s) for b, s, _ in call] for call in stub.calls] == [
        [("3", 0), ("3", 1)], [("3", 2)], [("4", 0), ("4", 1)], [("4", 2)]]  # a window's seeds, 2 at a time
    cache, backbone = stub.given
    assert cache.path == planted[0] and isinstance(cache, subcache.store.Cache) and backbone is planted[1]
    assert banks == [planted[1]] and [r["rung"] for r in result.rungs] == [0]
