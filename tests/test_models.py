"""Any timm / torchvision model cut by its own structure, and your own model from `package.module:factory`."""
import json
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import subcache
from subcache.cli.main import main
from subcache.data import to_input
from subcache.errors import UnknownModelError


@pytest.mark.parametrize("model, count", [("timm:resnet18", 8), ("timm:resnet50", 16), ("timm:convnext_atto", 12),
                                          ("efficientnet_b0", 16)])
def test_block_counts_follow_the_paper(model, count):
    b = subcache.load_backbone(model, "none", image_size=32)
    assert b.num_blocks == count and len(set(b.block_names)) == count


def _pieces(b, x):
    h = b.run_blocks(b.prefix(x, 3), 3, b.num_blocks)  # prefix → input of block 3, then blocks 3..N
    features = b.neck(h)
    return features, b.head(features)


@pytest.mark.parametrize("model", ["timm:resnet18", "timm:convnext_atto"])
def test_timm_cut_reproduces_the_models_own_forward(model):
    b = subcache.load_backbone(model, "none", image_size=64)
    net = b.model
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        features, logits = _pieces(b, x)
        assert torch.equal(features, net.forward_head(net.forward_features(x), pre_logits=True))
        assert torch.equal(logits, net(x))


@pytest.mark.parametrize("model, count", [("convnext_tiny", 18), ("mobilenet_v3_small", 11)])
def test_torchvision_features_cut_reproduces_the_models_forward(model, count):
    b = subcache.load_backbone(model, "none", image_size=32)
    assert b.num_blocks == count
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(_pieces(b, x)[1], b.model(x))
    assert b.block_names[3].startswith("features.") and "blocks" not in b.block_names[3]


def test_a_model_that_cannot_be_cut_is_refused_with_the_way_out(monkeypatch, tmp_path):
    (tmp_path / "odd_model.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(3, 4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownModelError, match="from_modules"):
        subcache.load_backbone("odd_model:make")
    with pytest.raises(UnknownModelError, match="importable"):
        subcache.load_backbone("odd_model:nope")


FACTORY = textwrap.dedent("""
    import timm
    import torch
    from torch import nn
    import subcache

    def tiny():
        torch.manual_seed(0)
        stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        blocks = [nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(4)]
        neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for m in stem.modules():  # non-trivial statistics: batch statistics would give other activations
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.3)
                m.running_var.fill_(2.0)
        backbone = subcache.Backbone.from_modules(stem, blocks, neck, subcache.Preprocess(32, (0.5,) * 3, (0.25,) * 3))
        return backbone.train()  # left in train mode on purpose

    def plain():
        torch.manual_seed(0)
        return timm.create_model("resnet18", num_classes=4).train()
""")


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    folder = tmp_path / "pkg_src"
    (folder / "mymodels").mkdir(parents=True)
    (folder / "mymodels" / "__init__.py").write_text("")
    (folder / "mymodels" / "nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(folder))
    return "mymodels.nets"


def test_factory_returning_a_module_is_cut_and_frozen(factory_module):
    b = subcache.load_backbone(f"{factory_module}:plain")
    assert b.num_blocks == 8 and b.block_names[0] == "layer1.0" and not b.model.training
    assert b.model_id == f"{factory_module}:plain" and b.weights_id == "factory"


def test_factory_backbone_end_to_end_from_the_cli(factory_module, npz_path, tmp_path):
    model, out, task = f"{factory_module}:tiny", tmp_path / "c.zarr", tmp_path / "task"
    r = CliRunner().invoke(main, ["build", "--model", model, "--data", npz_path, "--layer", "blocks.2",
                                  "--dtype", "float32", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layers"] == [3]
    cache = subcache.open_cache(out)
    backbone = subcache.load_backbone(model)
    assert not backbone.model.training
    x = subcache.open_source(npz_path, "train").load(0, 4, backbone.preprocess)
    with torch.inference_mode():
        want = backbone.prefix(to_input(x, backbone.preprocess), 3)
    assert torch.allclose(cache.read_x("train", 0, 4), want)  # eval-mode statistics, not batch statistics
    r = CliRunner().invoke(main, ["train", "--cache", str(out), "--blocks", "3-4", "--epochs", "1", "--out",
                                  str(task), "--json"])
    assert r.exit_code != 0 and "--allow-factory" in r.output  # a cache never runs the code it names by itself
    r = CliRunner().invoke(main, ["train", "--cache", str(out), "--blocks", "3-4", "--epochs", "1", "--out",
                                  str(task), "--json", "--allow-factory", model])
    assert r.exit_code == 0, r.output
    assert json.loads((task / "task.json").read_text())["backbone"]["model"] == model  # rebuildable
    for args in (["evaluate", "--task", str(task), "--cache", str(out), "--json"],
                 ["predict", "--task", str(task), "--data", npz_path, "--limit", "8", "--json"]):
        r = CliRunner().invoke(main, args, env={"SUBCACHE_ALLOW_FACTORY": model})
        assert r.exit_code == 0, r.output


def test_build_puts_a_backbone_left_in_train_mode_into_eval_mode(factory_module, npz_path, tmp_path):
    from mymodels.nets import tiny

    backbone = tiny()
    assert backbone.model.training
    config = subcache.BuildConfig(out=str(tmp_path / "c.zarr"), layers=("2",), data=npz_path, dtype="float32",
                                  splits=("test",), limit=8)
    subcache.build_cache(config, backbone=backbone)
    x = subcache.open_source(npz_path, "test").load(0, 8, backbone.preprocess)
    with torch.inference_mode():
        want = backbone.eval().prefix(to_input(x, backbone.preprocess), 2)
    np.testing.assert_allclose(subcache.open_cache(config.out).read_x("test").numpy(), want.numpy(), atol=1e-6)
