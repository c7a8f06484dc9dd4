import json
from pathlib import Path

import pytest
import torch

import subcache
from subcache.errors import TaskError
from subcache.multitask import MultiTaskModel

WINDOWS = {"conv": ("resnet18", "3", [("3-4", False), ("5", False), ("4,6", True), ("8", False), ("6-8", False)]),
           "vit": ("timm:vit_tiny_patch16_224", "2", [("2-3", False), ("5", True), ("9-12", False), ("12", False)])}


@pytest.fixture(scope="module", params=list(WINDOWS))
def tasks(request, tmp_path_factory, npz_path):
    model, layer, windows = WINDOWS[request.param]
    backbone = subcache.load_backbone(model, "none", image_size=32)
    root = tmp_path_factory.mktemp(request.param)
    cache = str(root / "c.zarr")
    subcache.build_cache(subcache.BuildConfig(out=cache, layers=(layer,), model=model, weights="none",
                                              data=npz_path, image_size=32, dtype="float32"), backbone=backbone)
    dirs = []
    for blocks, siamese in windows:
        d = str(root / f"t{blocks.replace(',', '_')}")
        subcache.train(cache, subcache.TrainConfig(blocks=blocks, epochs=1, batch_size=64, siamese=siamese),
                       backbone=backbone, out=d)
        dirs.append(d)
    return backbone, cache, dirs


def test_multitask_outputs_equal_each_task_alone(tasks):
    backbone, cache, dirs = tasks
    model = MultiTaskModel.from_tasks(backbone, dirs)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out["original"], backbone(x))
        start = subcache.open_cache(cache).layer
        for d in dirs:
            alone = subcache.load_task(d).model(backbone)(backbone.prefix(x, start))
            torch.testing.assert_close(out[Path(d).name], alone, rtol=1e-5, atol=1e-5)
    without = MultiTaskModel.from_tasks(backbone, dirs, include_original=False)
    with torch.no_grad():
        assert "original" not in without(x)


def test_multitask_model_exports(tasks):
    backbone, _, dirs = tasks
    model = MultiTaskModel.from_tasks(backbone, dirs[:2])
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        for name, value in model(x).items():
            torch.testing.assert_close(exported.module()(x)[name], value)


def test_a_task_from_another_backbone_is_refused(tasks):
    _, _, dirs = tasks
    other = subcache.load_backbone("resnet18", "none", image_size=32, seed=7)
    with pytest.raises(TaskError, match="was trained on"):
        MultiTaskModel.from_tasks(other, dirs)


def test_siamese_task_round_trips(tasks):
    backbone, cache, dirs = tasks
    siamese = [d for d in dirs if json.loads((Path(d) / "task.json").read_text())["siamese"]][0]
    meta = json.loads((Path(siamese) / "task.json").read_text())
    assert subcache.evaluate_task(siamese, cache, backbone=backbone) == meta["metrics"]["test_accuracy"]
    head = subcache.load_task(siamese).state["head.weight"]
    assert head.shape[1] == 2 * backbone.features(
        backbone.stem(torch.zeros(1, 3, 32, 32)), 0).shape[-1]  # original + tuned features


def test_predict_cli(tasks, npz_path, tmp_path):
    from click.testing import CliRunner

    from subcache.cli.main import main

    backbone, _, dirs = tasks
    r = CliRunner().invoke(main, ["predict", "--task", dirs[0], "--task", dirs[1], "--data", npz_path, "--out",
                                  str(tmp_path / "p.csv"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["items"] == 96 and set(out["accuracy"]) == {Path(d).name for d in dirs[:2]}
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    a, b = Path(dirs[0]).name, Path(dirs[1]).name
    assert header == f"id,key,label,{a},{a}_prob,{b},{b}_prob"


@pytest.mark.parametrize("scope", ["local", "global"])
def test_pruned_task_round_trips_and_serves_in_multitask(tasks, tmp_path, scope):
    backbone, cache, dirs = tasks
    out = str(tmp_path / f"prune-0.5-{scope}")  # a dot in the name: module keys must not care
    blocks = subcache.open_cache(cache).layer
    window = f"{blocks + 1}-{blocks + 2}"
    result = subcache.train(cache, subcache.TrainConfig(blocks=window, epochs=1, batch_size=64, prune=0.5,
                                                        prune_scope=scope), backbone=backbone, out=out)
    assert 0.2 < result.param_fraction < 0.9
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    assert subcache.evaluate_task(out, cache, backbone=backbone) == result.test_accuracy
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())  # frozen untouched
    model = MultiTaskModel.from_tasks(backbone, [out, dirs[0]])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        alone = subcache.load_task(out).model(backbone)(backbone.prefix(x, subcache.open_cache(cache).layer))
        torch.testing.assert_close(model(x)[Path(out).name], alone, rtol=1e-5, atol=1e-5)


def test_grouped_convolution_rewrite_equals_the_multitask_model():
    import copy

    from torch import nn

    from subcache.multitask import GroupedPairModel, TaskBranch

    backbone = subcache.load_backbone("resnet50", "none", image_size=64)
    torch.manual_seed(1)
    blocks = {i: copy.deepcopy(backbone.block(i)) for i in (15, 16)}
    for block in blocks.values():  # a "trained" task: perturbed weights and statistics
        for p in block.parameters():
            p.data += 0.05 * torch.randn_like(p)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean += 0.1
    head = nn.Linear(2048, 5)
    grouped = GroupedPairModel(backbone, blocks, head).eval()
    multi = MultiTaskModel(backbone, {"task": TaskBranch(blocks, head, False)}).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a, b = grouped(x), multi(x)
    torch.testing.assert_close(a["original"], b["original"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a["task"], b["task"], rtol=1e-4, atol=1e-4)
    with pytest.raises(TaskError, match="at most 2"):
        GroupedPairModel(backbone, {i: backbone.block(i) for i in (14, 15, 16)}, head)
