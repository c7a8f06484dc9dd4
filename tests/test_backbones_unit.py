"""The backbone contract, exactly, on a hand-made backbone whose blocks are distinguishable: which blocks run for
a prefix / features / forward, how blocks are addressed, the fingerprint, the per-block facts and the cut check
(each test kills mutants that `examples/mutation.sh backbones/core` and `backbones/factory` found surviving)."""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from subcache.backbones.core import (Backbone, Fn, Preprocess, _Lead, checked, describe_blocks, parse_block_spec,
                                     state_dict_sha256, with_lead)
from subcache.errors import BlockError, UnknownModelError

PRE = Preprocess(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


class Step(nn.Module):
    """h → h · 2 + k: any change of which blocks run, or in which order, changes the result."""

    def __init__(self, k: float):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(float(k)))

    def forward(self, h):
        return h * 2 + self.k


def toy(n=4, **kw) -> Backbone:
    stem = Fn(nn.Identity(), lambda m, x: x[:, :1, 0, :4], "stem")  # (B, 3, S, S) → (B, 4)
    neck = Fn(nn.Identity(), lambda m, h: h + 100, "neck")
    return Backbone.from_modules(stem, [Step(k) for k in range(1, n + 1)], neck, PRE, **kw)


def _run(h, ks):
    for k in ks:
        h = h * 2 + k
    return h


def test_prefix_features_and_forward_run_exactly_their_blocks():
    head = nn.Linear(4, 2)
    b = toy(head=head)
    assert b.head is head and b.model.head is head
    x = torch.randn(3, 3, 8, 8)
    h = x[:, :1, 0, :4]
    assert torch.equal(b.prefix(x, 1), h)
    assert torch.equal(b.prefix(x, 3), _run(h, [1, 2]))
    assert torch.equal(b.prefix(x, 5), _run(h, [1, 2, 3, 4]))
    assert torch.equal(b.run_blocks(h, 2, 3), _run(h, [2, 3])) and torch.equal(b.run_blocks(h, 3, 2), h)
    assert torch.equal(b.features(h, 2), _run(h, [3, 4]) + 100) and torch.equal(b.features(h, 4), h + 100)
    assert torch.equal(b(x), b.head(_run(h, [1, 2, 3, 4]) + 100))


def test_from_modules_is_frozen_named_and_identified():
    b = toy()
    assert not b.training and not any(p.requires_grad for p in b.parameters())
    assert isinstance(b.head, nn.Identity) and b.num_blocks == 4 and b.block(2).k.item() == 2
    assert b.block_names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert b.identity() == {"model": "custom", "weights": "custom", "weights_sha256": state_dict_sha256(b.model)}
    named = toy(model_id="mine", weights_id="w1")
    assert named.identity()["model"] == "mine" and named.identity()["weights"] == "w1"
    assert b.stem.extra_repr() == "stem" and b.preprocess.to_dict() == {
        "image_size": 8, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0,
        "interpolation": "bilinear"}


def test_resolve_by_index_or_name_and_its_messages():
    b = toy(model_id="toy")
    assert [b.resolve(s) for s in (1, "4", " 2 ", "blocks.2", " blocks.0 ")] == [1, 4, 2, 3, 1]
    for bad in (0, 5, "05"):
        with pytest.raises(BlockError) as e:
            b.resolve(bad)
        assert str(e.value) == f"block {int(bad)} is out of range (1 to 4) for toy"
    for bad in ("blocks.9", "-1", "1.5", ""):
        with pytest.raises(BlockError) as e:
            b.resolve(bad)
        assert str(e.value) == f"unknown block {bad!r} for toy; valid: blocks.0 … blocks.3 or 1-4"


def test_parse_block_spec_ranges_lists_and_probe():
    b = toy(n=6, model_id="toy")
    for probe in ("none", " NONE ", "head", "Head", "", "  "):
        assert parse_block_spec(probe, b) == ()
    assert parse_block_spec("3", b) == (3,)
    assert parse_block_spec("2-4", b) == (2, 3, 4)
    assert parse_block_spec("5,1-2,2", b) == (1, 2, 5)
    assert parse_block_spec("blocks.1-blocks.3", b) == (2, 3, 4)
    assert parse_block_spec("4-4", b) == (4,)
    with pytest.raises(BlockError) as e:
        parse_block_spec("1,5-3", b)
    assert str(e.value) == "block range '5-3' is reversed; write low-high, e.g. 3-5"
    with pytest.raises(BlockError) as e:  # one range per part: the second dash belongs to its upper end
        parse_block_spec("1-2-3", b)
    assert str(e.value) == "unknown block '2-3' for toy; valid: blocks.0 … blocks.5 or 1-6"


def test_input_shape_from_images_or_from_a_start_shape():
    class Widen(nn.Module):
        def forward(self, h):
            return torch.cat([h, h], -1)

    stem = Fn(nn.Identity(), lambda m, x: x[:, 0, 0, :], "stem")
    b = Backbone.from_modules(stem, [Widen(), Widen(), Widen()], nn.Identity(), PRE)
    assert [b.input_shape(i) for i in (1, 2, 3, 4)] == [(8,), (16,), (32,), (64,)]
    assert b.input_shape(3, start=2, start_shape=(5,)) == (10,)
    assert b.input_shape(4, start=2, start_shape=(5,)) == (20,) and b.input_shape(2, start=2, start_shape=(5,)) == (5,)


def test_state_dict_sha256_covers_names_shapes_dtypes_and_bytes():
    m = nn.Module()
    m.a = nn.Parameter(torch.tensor([[1.0, 2.0]]))
    m.register_buffer("e", torch.zeros(0))
    want = hashlib.sha256()
    want.update(b"a:(1, 2):torch.float32")
    want.update(torch.tensor([1.0, 2.0]).numpy().tobytes())
    want.update(b"e:(0,):torch.float32")
    assert state_dict_sha256(m) == want.hexdigest()
    base = state_dict_sha256(m)
    for change in (lambda: m.a.data.copy_(torch.tensor([[1.0, 3.0]])),
                   lambda: setattr(m, "a", nn.Parameter(torch.tensor([[1.0], [3.0]])))):
        change()
        assert state_dict_sha256(m) != base
        base = state_dict_sha256(m)


def test_with_lead_names_the_block_and_runs_the_lead_first():
    block, lead = Step(3), Step(1)
    assert with_lead(None, block) is block and with_lead(nn.Identity(), block) is block
    led = with_lead(lead, block)
    assert isinstance(led, _Lead) and led.named is block and list(led.children()) == [lead, block]
    h = torch.tensor([1.0])
    assert torch.equal(led(h), _run(h, [1, 3]))
    model = nn.Module()
    model.down, model.layer = lead, nn.ModuleList([block])
    b = Backbone(model, nn.Identity(), [led], nn.Identity(), nn.Identity(), model_id="m", weights_id="w",
                 preprocess=PRE)
    assert b.block_names == ["layer.0"]


def test_checked_accepts_a_faithful_cut_and_refuses_another():
    sizes = []

    class Net(nn.Module):
        def __init__(self, b, off):
            super().__init__()
            self.b, self.off, self.drop = b, off, nn.Dropout(0.9)

        def forward(self, x):
            sizes.append(x.shape)
            return self.b(x) + self.off + self.drop(torch.zeros(1)) * 0

    b = toy()
    net = Net(b, 0.0).train()
    assert checked(b, net) is b and not net.training and sizes[-1] == (1, 3, 8, 8)
    assert checked(b, Net(b, 9e-6)) is b  # within atol 1e-5
    big = Backbone.from_modules(Fn(nn.Identity(), lambda m, x: x[:, :1, 0, :4], "stem"), [Step(1)],
                                nn.Identity(), Preprocess(100, PRE.mean, PRE.std), model_id="big")
    checked(big, Net(big, 0.0))
    assert sizes[-1] == (1, 3, 64, 64)  # checked at 64 px at most
    with pytest.raises(UnknownModelError) as e:
        checked(big, Net(big, 1e-3))
    assert str(e.value) == ("big: stem + blocks + neck do not reproduce the model's forward; build a "
                            "subcache.Backbone.from_modules(...) for it")


def test_describe_blocks_counts_params_shapes_and_flops_per_block():
    stem = Fn(nn.Identity(), lambda m, x: x[:, 0, 0, :], "stem")  # (B, 8)
    b = Backbone.from_modules(stem, [nn.Linear(8, 6), nn.Linear(6, 2, bias=False)], nn.Identity(), PRE)
    infos = describe_blocks(b)
    assert [(i.index, i.name, i.params, i.input_shape, i.flops) for i in infos] == [
        (1, "blocks.0", 8 * 6 + 6, (8,), 2 * 8 * 6), (2, "blocks.1", 6 * 2, (6,), 2 * 6 * 2)]


# -- factory: `--model package.module:factory` ----------------------------------------------------------------------
@pytest.fixture
def factories(monkeypatch):
    """An importable module `subcache_test_factories` holding factories of each kind (no file on disk)."""
    import sys
    import types

    import timm
    import torchvision

    mod = types.ModuleType("subcache_test_factories")
    mod.made = []

    def remember(net):
        mod.made.append(net)
        return net.train()  # left in train mode on purpose

    mod.timm_net = lambda: remember(timm.create_model("test_efficientnet", num_classes=4))
    mod.tv_net = lambda: remember(torchvision.models.resnet18(num_classes=4))
    mod.backbone = lambda: toy(3)
    mod.number = lambda: 42
    monkeypatch.setitem(sys.modules, "subcache_test_factories", mod)
    return mod


def test_factory_matches_only_module_colon_function():
    from subcache.backbones import factory

    assert factory.matches("pkg.sub_mod:make_net") and factory.matches("m:f")
    assert not factory.matches("resnet18") and not factory.matches("pkg.mod:") and not factory.matches("a:b:c")
    assert factory.known() == ["package.module:factory (your own model)"]


def test_factory_module_is_cut_by_its_family_and_frozen(factories):
    from subcache.backbones import factory

    b = factory.load("subcache_test_factories:timm_net", "none", None)
    assert b.block_names == ["blocks.0.0", "blocks.1.0", "blocks.2.0", "blocks.3.0", "blocks.4.0"]  # timm's cut
    assert b.model is factories.made[0] and not b.model.training  # eval: never built from batch statistics
    assert b.model_id == "subcache_test_factories:timm_net" and b.weights_id == "factory"
    assert b.preprocess.image_size == factories.made[0].pretrained_cfg["input_size"][-1]
    assert b.weights_sha256 == state_dict_sha256(b.model)
    tv = factory.load("subcache_test_factories:tv_net", "imagenet", 48)
    assert tv.num_blocks == 8 and tv.block_names[0] == "layer1.0" and not tv.model.training
    assert tv.preprocess.image_size == 48 and tv.weights_id == "factory" and tv.model_id == \
        "subcache_test_factories:tv_net"
    assert factory.load("subcache_test_factories:tv_net", "default", None).weights_id == "factory"


def test_factory_backbone_keeps_its_preprocess_unless_a_size_is_given(factories):
    from subcache.backbones import factory

    b = factory.load("subcache_test_factories:backbone", "none", None)
    assert b.model_id == "subcache_test_factories:backbone" and b.preprocess == PRE and b.weights_id == "factory"
    assert factory.load("subcache_test_factories:backbone", "none", 16).preprocess == Preprocess(
        16, PRE.mean, PRE.std)


def test_factory_weights_file_is_loaded_on_top(factories, tmp_path):
    from subcache.backbones import factory

    made = toy(3)
    with torch.no_grad():
        for p in made.model.parameters():
            p.add_(1.0)
    path = tmp_path / "w.pth"
    torch.save(made.model.state_dict(), path)
    b = factory.load("subcache_test_factories:backbone", str(path), None)
    assert b.weights_id == "file:w.pth" and b.weights_sha256 == state_dict_sha256(made.model)
    assert all(torch.equal(p, q) for p, q in zip(b.model.parameters(), made.model.parameters()))


@pytest.mark.parametrize("spec, message", [
    ("subcache_no_such_module:f", "cannot load model factory subcache_no_such_module:f (No module named"),
    ("subcache_test_factories:missing", "must be importable (on PYTHONPATH) and define missing()"),
    ("subcache_test_factories:number", "subcache_test_factories:number() returned int; it must return an nn.Module "
                                       "or a subcache.Backbone")])
def test_factory_errors_say_what_to_fix(factories, spec, message):
    from subcache.backbones import factory

    with pytest.raises(UnknownModelError) as e:
        factory.load(spec, "none", None)
    assert str(e.value).startswith(message) or message in str(e.value)


def test_factory_weights_that_do_not_fit_name_the_factory(factories, tmp_path):
    from subcache.backbones import factory
    from subcache.errors import WeightsError

    path = tmp_path / "other.pth"
    torch.save({k: torch.zeros(2) for k in toy(3).model.state_dict()}, path)  # every weight the wrong size
    with pytest.raises(WeightsError, match="weights .*other.pth do not fit subcache_test_factories:backbone"):
        factory.load("subcache_test_factories:backbone", str(path), None)
