"""The training engine: several runs as one batched model, the compiled step, set-up paid once per profile."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import subcache
from subcache.batched import groups, parse_batch_runs, train_many
from subcache.errors import ConfigError

FAST = dict(epochs=2, batch_size=16, limit=40, device="cpu")  # 3 steps an epoch, the last one short


def weights(result) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in result.model.task_state().items()}


def assert_same_runs(alone, together) -> None:
    """Same weights (float tolerance: K weight sets as one grouped convolution round differently), same scores."""
    for a, b in zip(alone, together):
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys()
        for k in wa:  # relative to the tensor's norm: Adam turns a near-zero gradient's rounding into ±lr steps
            assert (wb[k] - wa[k]).norm() <= 1e-3 * wa[k].norm() + 1e-6, k
        assert b.test_accuracy == pytest.approx(a.test_accuracy, abs=1 / 96 + 1e-9)  # at most one item flips
        assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-4)


@pytest.mark.parametrize("augment", ["none", "flip,crop"])
def test_batched_runs_equal_the_runs_done_one_by_one(resnet_cache, resnet18, augment):
    """Each seed keeps its head init, batch order, augmentation draws and optimiser state inside the batched model
    (its tuned BatchNorm's statistics too: the final test scores use them)."""
    configs = [subcache.TrainConfig(blocks="6", seed=seed, augment=augment, **FAST) for seed in (0, 1, 2)]
    alone = [subcache.train(resnet_cache, c, backbone=resnet18) for c in configs]
    together = train_many(resnet_cache, configs, backbone=resnet18, batch_runs=3)
    assert_same_runs(alone, together)
    assert not torch.equal(weights(together[0])["head.weight"], weights(together[1])["head.weight"])
    for a, b in zip(alone, together):  # the tuned block's BatchNorm statistics moved, per run
        bn = [k for k in weights(a) if k.endswith("running_mean")]
        assert bn and all(torch.allclose(weights(a)[k], weights(b)[k], atol=1e-4) for k in bn)


def test_batch_runs_option():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert parse_batch_runs("auto", cuda) >= 2 and parse_batch_runs("auto", cpu) == 1  # measured not to pay on CPU
    assert parse_batch_runs("off", cuda) == 1 and parse_batch_runs("3", cpu) == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(ConfigError, match="--batch-runs must be auto, off or a whole number"):
            parse_batch_runs(bad)
    assert groups([1, 1, 1, 2, 1], key=lambda x: x, most=2) == [[1, 1], [1], [2], [1]]


def test_profile_batch_runs_equals_off_and_the_cli_refuses_a_bad_value(resnet_cache, tmp_path, monkeypatch):
    from subcache import batched
    from subcache.cli.main import main

    stacked, real = [], batched.Stacked.train
    monkeypatch.setattr(batched.Stacked, "train", lambda self: stacked.append(len(self.runs)) or real(self))
    base = ["profile", "--cache", resnet_cache, "--range", "6-7", "--repeats", "2", "--no-probe", "--epochs", "2",
            "--batch-size", "16", "--examples", "40", "--device", "cpu", "--json"]
    runs = {}
    for mode in ("off", "2"):
        done = CliRunner().invoke(main, base + ["--batch-runs", mode, "--out", str(tmp_path / mode)])
        assert done.exit_code == 0, done.output
        runs[mode] = json.loads((tmp_path / mode / "profile.json").read_text())["runs"]
    assert [(r["blocks"], r["seed"]) for r in runs["2"]] == [("6", 0), ("6", 1), ("7", 0), ("7", 1)]
    assert stacked == [2, 2]  # `2`: each window's two seeds as one batched model; `off`: none
    for off, auto in zip(runs["off"], runs["2"]):
        assert (off["blocks"], off["seed"]) == (auto["blocks"], auto["seed"])
        assert auto["test_accuracy"] == pytest.approx(off["test_accuracy"], abs=1 / 96 + 1e-9)
    bad = CliRunner().invoke(main, base + ["--batch-runs", "0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "must be auto, off or a whole number" in bad.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("blocks", ["none", pytest.param("6", marks=pytest.mark.slow)])
def test_compiled_step_equals_eager(resnet_cache, resnet18, blocks):
    """`--compile on` runs the step through torch.compile (inductor on the CPU) and trains the same weights;
    `auto` leaves the CPU eager (measured not to pay there). The probe compiles in seconds; a tuned block (with
    BatchNorm updating its statistics inside the graph) takes a minute on 2 cores: slow."""
    from torch._dynamo.utils import counters

    from subcache.devices import compile_enabled

    assert not compile_enabled("auto", torch.device("cpu")) and compile_enabled("on", torch.device("cpu"))
    config = subcache.TrainConfig(blocks=blocks, **FAST)
    torch._dynamo.reset()
    counters.clear()
    compiled = subcache.train(resnet_cache, replace(config, compile="on"), backbone=resnet18)
    assert counters["stats"]["unique_graphs"] == 2  # full batches and the short last one: one static graph each
    eager = subcache.train(resnet_cache, config, backbone=resnet18)
    assert counters["stats"]["unique_graphs"] == 2  # eager: nothing more compiled
    assert_same_runs([eager], [compiled])


COUNTING = """
import os, sys
import subcache.active as a
import subcache.batched as b

def counted(real, configs_of):
    def run(cache, jobs, *args, **kwargs):
        with open("{log}-" + os.environ["RANK"], "a") as f:
            f.write(" ".join(f"{{c.blocks}}:{{c.seed}}:{{c.epochs}}" for c in configs_of(jobs)) + " ")
        return real(cache, jobs, *args, **kwargs)
    return run

b.train_many = counted(b.train_many, lambda configs: configs)  # profile, halving
a.train = counted(a.train, lambda config: [config])  # al
a.train_runs = counted(a.train_runs, lambda jobs: [c for c, _ in jobs])
from subcache.cli.main import main
main(sys.argv[1:])
"""


def one_and_two_ranks(tmp_path, args: list[str]) -> dict[int, list[str]]:
    """The CLI run as one process into ``tmp_path/one`` and on 2 torchrun ranks (gloo, CPU) into ``tmp_path/two``,
    one thread each (the same kernels, the same float rounding); the runs each rank trained, as blocks:seed:epochs."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "subcache", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    script = tmp_path / "counting.py"  # the CLI, each rank noting the runs it trained
    script.write_text(COUNTING.format(log=str(tmp_path / "trained")))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, cwd=root, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(two.stdout.strip().splitlines()) == 1  # rank 0 reports, once
    return {r: (tmp_path / f"trained-{r}").read_text().split() for r in (0, 1)}


def test_a_torchrun_profile_deals_runs_to_ranks_and_equals_one_process(resnet_cache, tmp_path):
    """2 ranks: windows × seeds dealt to ranks, each rank training whole runs alone, rank 0 saving; the same rows as
    one process."""
    trained = one_and_two_ranks(tmp_path, ["profile", "--cache", resnet_cache, "--range", "6-7", "--repeats", "2",
                                           "--no-probe", "--epochs", "1", "--batch-size", "16", "--examples", "40",
                                           "--device", "cpu", "--json"])
    assert sorted(trained[0] + trained[1]) == ["6:0:1", "6:1:1", "7:0:1", "7:1:1"]
    assert len(trained[0]) == len(trained[1]) == 2  # dealt: each run trained once, on one rank
    rows = {k: json.loads((tmp_path / k / "profile.json").read_text())["runs"] for k in ("one", "two")}
    key = [(r["blocks"], r["seed"]) for r in rows["one"]]
    assert key == [("6", 0), ("6", 1), ("7", 0), ("7", 1)]
    assert [(r["blocks"], r["seed"]) for r in rows["two"]] == key
    assert [r["test_accuracy"] for r in rows["two"]] == [r["test_accuracy"] for r in rows["one"]]


def test_a_torchrun_halving_deals_each_rung_to_ranks_and_equals_one_process(resnet_cache, tmp_path):
    """Rung by rung: a rung's windows × seeds dealt to ranks; every rank ranks the rung from all its rows, so the
    survivors, rows and pick equal one process's."""
    trained = one_and_two_ranks(tmp_path, ["profile", "--halving", "--cache", resnet_cache, "--range", "6-7",
                                           "--repeats", "2", "--eta", "2", "--min-epochs", "1", "--epochs", "2",
                                           "--batch-size", "16", "--examples", "40", "--device", "cpu", "--json"])
    saved = {k: json.loads((tmp_path / k / "halving.json").read_text()) for k in ("one", "two")}
    last = saved["one"]["rungs"][1]["windows"][0]
    assert sorted(trained[0] + trained[1]) == sorted(["6:0:1", "6:1:1", "7:0:1", "7:1:1", f"{last}:0:2",
                                                      f"{last}:1:2"])
    assert len(trained[0]) == len(trained[1]) == 3  # dealt: each run trained once, on one rank
    assert saved["two"]["complete"] and saved["two"]["rungs"] == saved["one"]["rungs"]
    assert saved["two"]["best"] == saved["one"]["best"]
    assert ([(r["rung"], r["blocks"], r["seed"], r["val_accuracy"], r["test_accuracy"]) for r in saved["two"]["runs"]]
            == [(r["rung"], r["blocks"], r["seed"], r["val_accuracy"], r["test_accuracy"])
                for r in saved["one"]["runs"]])


def test_a_torchrun_al_deals_repeats_to_ranks_and_equals_one_process(resnet_cache, tmp_path):
    """A round's repeats dealt to ranks: each rank trains its seeds' models and scores the pool with them; every
    rank gets every seed's new labelled set, rank 0 saves; the same labelled sets and curves as one process."""
    trained = one_and_two_ranks(tmp_path, ["al", "--cache", resnet_cache, "--blocks", "7", "--budgets", "16,32",
                                           "--repeats", "2", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                                           "--json"])
    assert sorted(trained[0] + trained[1]) == ["7:0:1", "7:0:1", "7:1:1", "7:1:1"]
    assert len(trained[0]) == len(trained[1]) == 2  # each rank one seed a round
    state = {k: json.loads((tmp_path / k / "margin" / "state.json").read_text()) for k in ("one", "two")}
    assert [len(run["curve"]) for run in state["one"]["seeds"].values()] == [2, 2]
    assert state["two"]["seeds"] == state["one"]["seeds"]
    labelled = [state["one"]["seeds"][seed]["labelled"] for seed in ("0", "1")]
    assert len(labelled[0]) == len(labelled[1]) == 32 and labelled[0] != labelled[1]


def counting_stacked(monkeypatch) -> list[int]:
    """The sizes of the batched models trained from here on."""
    from subcache import batched

    stacked, real = [], batched.Stacked.train
    monkeypatch.setattr(batched.Stacked, "train", lambda self: stacked.append(len(self.runs)) or real(self))
    return stacked


@pytest.mark.parametrize("augment", ["none", pytest.param("crop", marks=pytest.mark.slow)])
def test_runs_on_their_own_positions_equal_the_runs_done_one_by_one(resnet_cache, resnet18, augment, monkeypatch):
    """AL repeats and greedy's folds: each run trains on its own positions (and labels) and is scored on its own
    held-out positions, with its own seed's batch order, draws and head — as it would be alone."""
    import numpy as np

    from subcache.batched import train_runs
    from subcache.train import TrainData

    rng = np.random.default_rng(5)
    noise = torch.from_numpy(rng.integers(0, 4, 192))  # labels of their own: the last run learns noise
    jobs = []
    for seed, labels in ((0, None), (1, None), (1, noise)):  # the last two share a seed, not their data
        chosen = np.sort(rng.choice(192, 72, replace=False))
        data = TrainData(chosen[:40], labels, eval_positions=chosen[40:])
        jobs.append((subcache.TrainConfig(blocks="6", seed=seed, augment=augment, **FAST), data))
    alone = [subcache.train(resnet_cache, c, d, backbone=resnet18) for c, d in jobs]
    stacked = counting_stacked(monkeypatch)
    together = train_runs(resnet_cache, jobs, backbone=resnet18, batch_runs=3)
    assert stacked == [3]
    assert_same_runs(alone, together)
    assert not torch.allclose(weights(together[1])["head.weight"], weights(together[2])["head.weight"], atol=1e-3)
    assert len({r.test_accuracy for r in alone}) > 1  # scored on their own positions and labels


def test_runs_of_unequal_sizes_train_one_by_one(resnet_cache, resnet18, monkeypatch):
    """Only runs with as many positions share a batched model (their steps line up); the rest train alone."""
    import numpy as np

    from subcache.batched import train_runs
    from subcache.train import TrainData

    config = subcache.TrainConfig(blocks="none", **FAST)
    jobs = [(config, TrainData(np.arange(n))) for n in (40, 41, 41)]
    stacked = counting_stacked(monkeypatch)
    results = train_runs(resnet_cache, jobs, backbone=resnet18, batch_runs=3)
    assert stacked == [2] and [r.num_samples for r in results] == [40, 41, 41]


def test_greedy_batch_runs_equals_off(resnet_cache, tmp_path, monkeypatch):
    """`greedy --folds 2 --batch-runs 2`: each candidate's two folds as one batched model, the same path."""
    from subcache.cli.main import main

    stacked = counting_stacked(monkeypatch)
    base = ["greedy", "--cache", resnet_cache, "--range", "7-7", "--folds", "2", "--epochs", "1", "--batch-size",
            "16", "--examples", "40", "--device", "cpu", "--epsilon", "-1", "--json"]
    paths = {}
    for mode in ("off", "2"):
        done = CliRunner().invoke(main, base + ["--batch-runs", mode, "--out", str(tmp_path / mode)])
        assert done.exit_code == 0, done.output
        paths[mode] = json.loads((tmp_path / mode / "greedy.json").read_text())["path"]
    assert stacked == [2, 2]  # candidates none and 7: each one's two folds together; `off`: none
    assert [p["blocks"] for p in paths["2"]] == [p["blocks"] for p in paths["off"]] == ["none", "7"]
    assert [p["score"] for p in paths["2"]] == pytest.approx([p["score"] for p in paths["off"]], abs=1 / 20 + 1e-9)
    bad = CliRunner().invoke(main, base + ["--batch-runs", "x", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "must be auto, off or a whole number" in bad.output


def test_al_batch_runs_equals_off(resnet_cache, tmp_path, monkeypatch):
    """`al --repeats 2 --batch-runs 2`: each round of both repeats as one batched model — each repeat its own
    labelled set, its own model choosing its next items — with the same labelled sets and curve as one by one."""
    from subcache.cli.main import main

    stacked = counting_stacked(monkeypatch)
    base = ["al", "--cache", resnet_cache, "--blocks", "6", "--budgets", "24,40", "--repeats", "2", "--epochs", "1",
            "--batch-size", "16", "--device", "cpu", "--json"]
    states, curves = {}, {}
    for mode in ("off", "2"):
        done = CliRunner().invoke(main, base + ["--batch-runs", mode, "--out", str(tmp_path / mode)])
        assert done.exit_code == 0, done.output
        states[mode] = json.loads((tmp_path / mode / "margin" / "state.json").read_text())["seeds"]
        curves[mode] = json.loads((tmp_path / mode / "margin" / "curve.json").read_text())
    assert stacked == [2, 2]  # round 1 and round 2, both repeats together
    assert states["2"]["0"]["labelled"] != states["2"]["1"]["labelled"]
    assert {s: v["labelled"] for s, v in states["2"].items()} == {s: v["labelled"] for s, v in states["off"].items()}
    assert [(c["seed"], c["budget"]) for c in curves["2"]] == [(c["seed"], c["budget"]) for c in curves["off"]]
    assert [c["accuracy"] for c in curves["2"]] == pytest.approx([c["accuracy"] for c in curves["off"]],
                                                                 abs=1 / 96 + 1e-9)


def test_stream_read_ahead_hands_windows_over_in_order_and_adds_readers_while_the_step_waits(chunked_cache):
    """The read-ahead path (readers decoding chunks at once, windows joined and staged ahead in the background,
    the staging ring the GPU uses): the same batches, in the same order, as one reader one window ahead — while
    odd chunks decode last; and a step that waited gets more readers next epoch."""
    import time

    from subcache.loader import StreamLoader

    cache = chunked_cache
    y = cache.read_y("train")

    def batches(loader, delay=0.0, epochs=3):
        read = loader._chunk
        loader._chunk = lambda split, c: time.sleep(delay * (c % 2)) or read(split, c)  # odd chunks finish last
        return [b for epoch in range(epochs) for b in loader.epoch(epoch)]

    plain = StreamLoader(cache, "train", None, y, 16, 0, torch.device("cpu"), window=2, depth=1, readers=1)
    ahead = StreamLoader(cache, "train", None, y, 16, 0, torch.device("cpu"), window=2, depth=3, staging=True)
    ahead.max_readers = 4
    one, many = batches(plain), batches(ahead, delay=0.03)
    assert len(one) == len(many) == 3 * plain.steps_per_epoch
    for (x1, _, y1), (x2, _, y2) in zip(one, many):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert ahead.waits[0] > 0 and ahead.reading > 1  # it waited on slow reads: more readers
    assert plain.reading == 1  # a fixed count stays
