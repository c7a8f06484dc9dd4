import pytest
import torch

import subcache
from subcache.backbones import map_lite_state_dict, parse_block_spec
from subcache.errors import BlockError, UnknownModelError, WeightsError

COUNTS = {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33, "resnet152": 50, "wide_resnet50_2": 16,
          "vit_b_16": 12, "vit_b_32": 12, "vit_l_16": 24, "efficientnet_lite0": 16, "efficientnet_lite2": 21,
          "timm:vit_tiny_patch16_224": 12, "timm:mobilenetv3_small_100": 12}


@pytest.mark.parametrize("model", list(COUNTS))
def test_block_counts_and_names_come_from_the_module_tree(model):
    size = 224 if model == "vit_l_16" else 32
    b = subcache.load_backbone(model, "none", image_size=size)
    assert b.num_blocks == COUNTS[model]
    assert len(set(b.block_names)) == b.num_blocks
    assert all(not p.requires_grad for p in b.parameters()) and not b.training


@pytest.mark.parametrize("model", ["resnet18", "vit_b_16", "efficientnet_lite0", "timm:vit_tiny_patch16_224",
                                   "timm:mobilenetv3_small_100"])
def test_stem_blocks_neck_head_compose_to_the_original_model(model):
    b = subcache.load_backbone(model, "none", image_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b(x), b.model(x), rtol=0, atol=0)
        mid = b.prefix(x, 5)
        torch.testing.assert_close(b.head(b.features(mid, 4)), b.model(x), rtol=0, atol=0)


def test_layer_names_and_indices_are_the_same_block():
    b = subcache.load_backbone("resnet50", "none", image_size=32)
    assert b.resolve("layer3.5") == 13 == b.resolve("13")
    assert b.block_names[12] == "layer3.5"
    assert parse_block_spec("layer3.5-layer4.0", b) == (13, 14)
    assert parse_block_spec("13,15", b) == (13, 15)
    assert parse_block_spec("none", b) == ()


@pytest.mark.parametrize("spec, message", [("layer5", "valid: layer1.0 … layer4.2 or 1-16"),
                                           ("17", "out of range (1 to 16)"), ("0", "out of range"),
                                           ("14-13", "reversed")])
def test_bad_blocks_say_what_is_valid(spec, message):
    b = subcache.load_backbone("resnet50", "none", image_size=32)
    with pytest.raises(BlockError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_block_spec(spec, b)


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError, match="known: efficientnet_lite0"):
        subcache.load_backbone("resnet9000")


def test_missing_hub_weights_name_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"resnet50-11ad3fa6\.pth in .*checkpoints"):
        subcache.load_backbone("resnet50", "imagenet")


def test_local_weights_round_trip_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    b = subcache.load_backbone("resnet18", "none", image_size=32, seed=3)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in b.model.state_dict().items()}, str(path))
    again = subcache.load_backbone("resnet18", str(path), image_size=32)
    assert again.weights_sha256 == b.weights_sha256
    with pytest.raises(WeightsError, match="do not fit"):
        subcache.load_backbone("resnet34", str(path), image_size=32)
    with pytest.raises(WeightsError, match="does not exist"):
        subcache.load_backbone("resnet18", str(tmp_path / "nope.pth"))


def test_lite_key_map_asserts_every_shape():
    target = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    assert list(map_lite_state_dict({"x": torch.ones(2, 3), "y": torch.ones(4)}, target)) == ["a.weight", "b.weight"]
    with pytest.raises(WeightsError, match="does not fit"):
        map_lite_state_dict({"x": torch.ones(3, 2), "y": torch.ones(4)}, target)


def test_describe_blocks_counts_params_and_flops():
    b = subcache.load_backbone("resnet18", "none", image_size=32)
    infos = subcache.describe_blocks(b)
    assert [i.index for i in infos] == list(range(1, 9))
    assert infos[0].input_shape == (64, 8, 8) and infos[-1].input_shape == (512, 1, 1)
    assert sum(i.params for i in infos) == sum(p.numel() for blk in b.blocks for p in blk.parameters())
    assert all(i.flops > 0 for i in infos)


@pytest.mark.parametrize("model", ["resnet18", "efficientnet_lite0", "timm:vit_tiny_patch16_224"])
def test_state_dict_holds_each_tensor_once(model):
    b = subcache.load_backbone(model, "none", image_size=32)
    state = b.state_dict()
    assert len(state) == len(b.model.state_dict())  # resnet18: 122, not 368
    if model == "resnet18":
        assert len(state) == 122
    storages = [v.untyped_storage().data_ptr() for v in state.values() if v.numel()]
    assert len(storages) == len(set(storages))  # no tensor appears under two names
    assert len(list(b.parameters())) == len(list(b.model.parameters()))
