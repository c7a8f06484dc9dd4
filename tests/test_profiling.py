import json

import numpy as np
import pytest
import torch

import subcache
from subcache.errors import BlockError
from subcache.selection import greedy_search, parse_range, windows


def test_windows_at_range_edges():
    assert windows(9, 16, 1) == [(b,) for b in range(9, 17)]
    assert windows(9, 16, 2)[0] == (9, 10) and windows(9, 16, 2)[-1] == (15, 16) and len(windows(9, 16, 2)) == 7
    assert windows(15, 16, 2) == [(15, 16)]
    assert windows(16, 16, 1) == [(16,)]
    with pytest.raises(BlockError, match="larger than the range"):
        windows(15, 16, 3)


@pytest.mark.parametrize("spec, message", [("8-6", "reversed"), ("2-7", "starts before this cache's layer"),
                                           ("7-", "LOW-HIGH"), ("6-9", "out of range")])
def test_bad_ranges_are_one_line(resnet_cache, resnet18, spec, message):
    with pytest.raises(BlockError, match=message):
        parse_range(spec, subcache.open_cache(resnet_cache), resnet18)


def test_greedy_on_a_stub_scorer_picks_the_known_best_set_and_stops_on_epsilon():
    value = {(): 0.5, (3,): 0.6, (5,): 0.7, (3, 5): 0.8, (4, 5): 0.72, (5, 6): 0.705}
    calls = []

    def score(blocks):
        calls.append(blocks)
        return value.get(blocks, 0.4)

    result = greedy_search(score, [3, 4, 5, 6], epsilon=0.05)
    assert result.blocks == (3, 5) and result.score == 0.8
    assert [p["blocks"] for p in result.path] == ["none", "5", "3,5"]
    # a third block would add < ε: stopped; with a larger ε it stops one step earlier
    assert greedy_search(score, [3, 4, 5, 6], epsilon=0.15).blocks == (5,)
    assert greedy_search(score, [3, 4, 5, 6], epsilon=0.05, consecutive=True).blocks == (5,)  # (4, 5) gains 0.02
    assert greedy_search(score, [3, 4, 5, 6], epsilon=0.01, consecutive=True).blocks == (4, 5)
    assert greedy_search(score, [3, 4, 5, 6], epsilon=0.01, max_blocks=1).blocks == (5,)
    full = {(3, 4, 5, 6): 0.7, (3, 4, 5): 0.75, (4, 5): 0.74, (3, 5): 0.76}
    drop = greedy_search(lambda b: full.get(b, 0.1), [3, 4, 5, 6], epsilon=0.02, start="full")
    assert drop.blocks == (3, 5)


def test_profile_resumes_and_skips_finished_runs(resnet_cache, resnet18, tmp_path):
    config = subcache.ProfileConfig(blocks="7-8", widths=(1, 2), train=subcache.TrainConfig(epochs=1,
                                                                                            batch_size=64))
    seen = []
    first = subcache.profile_blocks(resnet_cache, config, out=str(tmp_path), backbone=resnet18,
                                    on_run=seen.append)
    assert [r["blocks"] for r in seen] == ["none", "7", "8", "7-8"]
    assert (tmp_path / "profile.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "profile.json").read_text())
    # a killed profile: only the first two runs made it to disk, recorded by the version whose default precision
    # was `auto` (fp32 off CUDA: the same runs)
    saved["runs"] = saved["runs"][:2]
    saved["config"]["train"]["precision"] = "auto"
    (tmp_path / "profile.json").write_text(json.dumps(saved))
    again = []
    second = subcache.profile_blocks(resnet_cache, config, out=str(tmp_path), backbone=resnet18,
                                     on_run=again.append)
    assert [r["blocks"] for r in again] == ["8", "7-8"]
    assert [r["test_accuracy"] for r in second.rows] == [r["test_accuracy"] for r in first.rows]
    lines = (tmp_path / "profile.csv").read_text().splitlines()
    assert lines[0].startswith("blocks,first,width,seed,test_accuracy") and len(lines) == 5


def test_shared_activations_give_the_same_runs(resnet_cache, resnet18):
    from subcache.bank import ActivationBank

    cache = subcache.open_cache(resnet_cache)
    bank = ActivationBank(cache, resnet18, torch.device("cpu"))
    for blocks in ("none", "8", "7-8"):
        config = subcache.TrainConfig(blocks=blocks, epochs=2, batch_size=64)
        plain = subcache.train(cache, config, backbone=resnet18)
        shared = subcache.train(cache, config, subcache.TrainData(bank=bank), backbone=resnet18)
        assert shared.test_accuracy == plain.test_accuracy
        for k, v in plain.model.task_state().items():
            torch.testing.assert_close(shared.model.task_state()[k], v, rtol=1e-5, atol=1e-6)


def test_derived_cache_equals_a_direct_build(tmp_path, npz_path, resnet18, resnet_cache):
    derived = str(tmp_path / "derived")
    result = subcache.derive_cache(subcache.DeriveConfig(source=resnet_cache, out=derived, layers=("7", "8"),
                                                         dtype="float16"), backbone=resnet18)
    direct = str(tmp_path / "direct")
    subcache.build_cache(subcache.BuildConfig(out=direct, layers=("7", "8"), model="resnet18", weights="none",
                                              data=npz_path, image_size=32), backbone=resnet18)
    for a, b in zip(result.paths, [f"{direct}/block07.zarr", f"{direct}/block08.zarr"]):
        ca, cb = subcache.open_cache(a), subcache.open_cache(b)
        assert ca.layer == cb.layer and ca.attrs["build"]["derived_from"] == resnet_cache
        for split in ("train", "test"):
            xa, xb = ca.read_x(split).float(), cb.read_x(split).float()
            # float16 rounding only: at most one float16 step apart
            assert torch.all((xa - xb).abs() <= xb.abs() * 2 ** -10 + 1e-6)
            np.testing.assert_array_equal(ca.split(split).y[:], cb.split(split).y[:])
            np.testing.assert_array_equal(ca.split(split).id[:], cb.split(split).id[:])
    with pytest.raises(BlockError, match="must come after it"):
        subcache.derive_cache(subcache.DeriveConfig(source=resnet_cache, out=str(tmp_path / "x"), layers=("5",)),
                              backbone=resnet18)


def test_profile_and_greedy_from_the_cli(resnet_cache, tmp_path):
    from click.testing import CliRunner

    from subcache.cli.main import main

    r = CliRunner().invoke(main, ["profile", "--cache", resnet_cache, "--range", "7-8", "--width", "1", "--epochs",
                                  "1", "--out", str(tmp_path / "p"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert {s["blocks"] for s in out["summary"]} == {"none", "7", "8"} and out["best"]["width"] == 1
    r = CliRunner().invoke(main, ["greedy", "--cache", resnet_cache, "--range", "7-8", "--epochs", "1", "--folds",
                                  "2", "--out", str(tmp_path / "g"), "--json"])
    assert r.exit_code == 0, r.output
    g = json.loads(r.stdout)
    assert g["path"][0]["blocks"] == "none"
    # the reported test accuracy is that of the final choice, trained once more on the whole training split
    chosen = ",".join(map(str, g["blocks"])) or "none"
    again = subcache.train(resnet_cache, subcache.TrainConfig(blocks=chosen, epochs=1)).test_accuracy
    assert g["test_accuracy"] == pytest.approx(again, abs=1.5 / 96)  # a shared bank may flip one borderline item
    assert (tmp_path / "g" / "greedy.csv").is_file() and (tmp_path / "g" / "greedy.png").is_file()
    r = CliRunner().invoke(main, ["profile", "--cache", resnet_cache, "--range", "7-8", "--width", "3", "--out",
                                  str(tmp_path / "p3")])
    assert r.exit_code == 1 and r.output.strip().startswith("Error: width 3 is larger than the range")


def test_resuming_a_profile_with_other_training_settings_is_refused(resnet_cache, resnet18, tmp_path):
    base = subcache.TrainConfig(epochs=1, batch_size=64)
    subcache.profile_blocks(resnet_cache, subcache.ProfileConfig(blocks="8-8", probe=False, train=base),
                            out=str(tmp_path), backbone=resnet18)
    from dataclasses import replace

    with pytest.raises(subcache.SubcacheError, match="other settings \\(epochs differ\\)"):
        subcache.profile_blocks(resnet_cache, subcache.ProfileConfig(blocks="8-8", train=replace(base, epochs=2)),
                                out=str(tmp_path), backbone=resnet18)


def test_window_errors_say_what_was_wrong_and_what_is_allowed():
    with pytest.raises(BlockError, match=r"^window width must be at least 1, got 0$"):
        windows(9, 16, 0)
    with pytest.raises(BlockError, match=r"^width 3 is larger than the range 15-16 \(2 blocks\)$"):
        windows(15, 16, 3)


def test_spec_of_spells_runs_and_sets():
    from subcache.selection import spec_of

    assert spec_of([]) == "none" and spec_of([7]) == "7" and spec_of([5, 3, 4]) == "3-5" and spec_of([3, 5]) == "3,5"


def test_validation_split_bounds_and_its_seeded_class_balanced_draw(resnet_cache, tmp_path):
    """0 means none; fractions outside (0, 1) are refused; validation needs ≥ 1 item and fit ≥ 2 (both edges
    allowed); the set is the class-balanced draw with seed 1 over the labels trained on (an extra label set too)."""
    import shutil

    from subcache.errors import DataError
    from subcache.selection import validation_split
    from subcache.train import TrainConfig, balanced_subset

    cache, config = subcache.open_cache(resnet_cache), TrainConfig()
    y = cache.read_y("train").numpy()
    n = len(y)
    assert validation_split(cache, config, 0) is None
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(DataError, match=rf"^--val-fraction must be between 0 and 1 \(e.g. 0.2\), got {bad}$"):
            validation_split(cache, config, bad)
    assert len(validation_split(cache, config, 1 / n)[1]) == 1  # the smallest validation set
    assert len(validation_split(cache, config, (n - 2) / n)[0]) == 2  # the smallest fit set
    with pytest.raises(DataError, match=rf"^--val-fraction .* of {n} training examples leaves {n - 1} for validation "
                                        rf"and 1 for training; each needs at least 1 \(training 2\)$"):
        validation_split(cache, config, (n - 1) / n)
    with pytest.raises(DataError, match=rf"leaves 0 for validation and {n} for training"):
        validation_split(cache, config, 0.4 / n)
    fit, val = validation_split(cache, config, 0.25)
    assert np.array_equal(val, balanced_subset(y, round(0.25 * n), 1))
    assert np.array_equal(fit, np.setdiff1d(np.arange(n), val))
    copy = tmp_path / "c.zarr"  # an extra label set of 3 unequal classes: the draw is balanced over those
    shutil.copytree(resnet_cache, copy)
    ids = cache.split("train").id[:]
    parity = [i % 3 if i % 5 else 0 for i in range(n)]  # classes c0 (the most), c1, c2
    (tmp_path / "l.csv").write_text("id,label\n" + "".join(f"{i},c{p}\n" for i, p in zip(ids, parity)))
    subcache.add_labels(str(copy), "odd", str(tmp_path / "l.csv"))
    extra = subcache.open_cache(str(copy))
    val = validation_split(extra, TrainConfig(labels="odd"), 0.25)[1]
    names = sorted({f"c{p}" for p in parity})
    assert np.array_equal(val, balanced_subset(np.asarray([names.index(f"c{p}") for p in parity]), round(0.25 * n), 1))
    assert not np.array_equal(val, balanced_subset(y, round(0.25 * n), 1))  # so the labels used are told apart
