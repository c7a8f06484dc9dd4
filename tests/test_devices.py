"""Device-correct by construction: every construction path runs with the backbone on PyTorch's `meta` device.

A tensor made on the CPU by accident (a shape probe, a head-sizing pass, a mask) meets the meta-device weights and
raises "Tensor on device meta is not on the expected device cpu" — the bug that kept `build` and `train` from
running on any GPU. No GPU is needed to catch it.
"""
import pytest
import torch

import subcache
from subcache.bank import ActivationBank
from subcache import derive
from subcache.multitask import MultiTaskModel
from subcache.task import Task
from subcache.tuned import TunedModel

pytestmark = pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
META = torch.device("meta")
# (model, cached layer, tuned blocks): a conv net and a transformer, random init at 32 px
BACKBONES = {"resnet18": ("resnet18", 6, (7, 8)), "vit": ("timm:vit_tiny_patch16_224", 4, (5, 6))}


@pytest.fixture(scope="module", params=list(BACKBONES))
def case(request, tmp_path_factory, npz_path):
    """(CPU backbone, the same backbone on meta, a float32 CPU-built cache at the layer, tuned blocks)."""
    model, layer, tuned = BACKBONES[request.param]
    cpu = subcache.load_backbone(model, "none", image_size=32)
    out = str(tmp_path_factory.mktemp("meta") / "c.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=(str(layer),), model=model, weights="none",
                                              data=npz_path, image_size=32, dtype="float32", limit=8,
                                              splits=("train",), device="cpu"), backbone=cpu)
    meta = subcache.load_backbone(model, "none", image_size=32).to(META)
    return cpu, meta, subcache.open_cache(out), tuned


def on_meta(module: torch.nn.Module) -> bool:
    return all(t.device == META for t in [*module.parameters(), *module.buffers()])


def test_the_shape_probe_runs_on_the_backbones_device(case):
    cpu, meta, cache, _ = case
    assert meta.input_shape(cache.layer) == cpu.input_shape(cache.layer) == cache.sample_shape
    assert meta.input_shape(cache.layer + 2) == cpu.input_shape(cache.layer + 2)


def test_tuned_model_is_built_on_the_backbones_device(case):
    _, meta, cache, tuned = case
    for siamese in (False, True):
        model = TunedModel(meta, cache.layer, tuned, 4, tuple(cache.attrs["sample_shape"]), siamese)
        assert on_meta(model)
        logits = model(torch.zeros(3, *cache.attrs["sample_shape"], device=META))
        assert logits.device == META and logits.shape == (3, 4)


def test_multitask_model_is_built_on_the_backbones_device(case):
    cpu, meta, cache, tuned = case
    state = TunedModel(cpu, cache.layer, tuned, 4, tuple(cache.attrs["sample_shape"])).task_state()
    meta_info = {"backbone": cpu.identity(), "blocks": list(tuned), "cache_layer": cache.layer,
                 "sample_shape": cache.attrs["sample_shape"], "classes": list("abcd")}
    # the task forks at its first tuned block, after its cache layer: the task sizes itself there
    model = MultiTaskModel.from_tasks(meta, [Task("t", meta_info, state)])
    out = model(torch.zeros(2, 3, 32, 32, device=META))
    assert on_meta(model) and out["t"].device == META and out["t"].shape == (2, 4)
    later = Task("t", meta_info, state).model(meta, start=tuned[0])
    assert on_meta(later)


def test_the_derive_probe_runs_on_the_backbones_device(case):
    cpu, meta, cache, _ = case
    layers = [cache.layer + 1, cache.layer + 3]
    assert derive.derived_shapes(cache, meta, layers) == derive.derived_shapes(cache, cpu, layers)
    assert derive.derived_shapes(cache, meta, layers) == {n: cpu.input_shape(n) for n in layers}


def test_the_banks_first_step_runs_on_its_device(case):
    _, meta, cache, _ = case
    bank = ActivationBank(cache, meta, META)
    h = bank.at("train", cache.layer + 1)
    assert h.device == META and h.shape[0] == len(cache.split("train"))
