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


# -- the CUDA speed path, driven on the CPU -----------------------------------------------------------------------
def test_resolve_device_rejects_what_it_cannot_give():
    from subcache.devices import resolve_device
    from subcache.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown device 'tpu'; allowed: auto, cpu, cuda"):
        resolve_device("tpu")
    assert issubclass(ConfigError, ValueError) and resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_stream_loader_reuses_its_staging_buffers_and_reshuffles_each_epoch(chunked_cache):
    from subcache.loader import StreamLoader

    cache = chunked_cache
    y = cache.read_y("train")
    loader = StreamLoader(cache, "train", None, y, 16, 0, torch.device("cpu"), window=2, staging=True)
    full = cache.read_x("train")
    orders = []
    for epoch in range(3):
        seen = []
        for x, _, yb in loader.epoch(epoch):
            rows = [int(torch.nonzero((full == r).flatten(1).all(1))[0]) for r in x]
            assert torch.equal(y[rows], yb)
            seen += rows
        assert sorted(seen) == list(range(len(y)))  # every sample exactly once per epoch
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]
    windows = 3 * -(-len(loader.chunks) // 2)
    x_stager = loader.stagers[0]
    assert windows >= 15 and x_stager.allocations <= 2 * len(x_stager.buffers)  # reused, not one per window


def test_precision_autocasts_only_the_trainable_part(resnet_cache, resnet18):
    from subcache.step import training_forward
    from subcache.train import TrainConfig

    cache = subcache.open_cache(resnet_cache)
    model = TunedModel(resnet18, 6, (8,), 4, cache.sample_shape)
    seen = []
    hook = resnet18.block(7).register_forward_hook(lambda m, i, o: seen.append(o.dtype))  # frozen bridge 6-7
    try:
        x = cache.read_x("train", 0, 4)
        cpu = torch.device("cpu")
        bf16 = training_forward(model, TrainConfig(precision="bf16"), cpu, model.frozen_part, None)
        assert bf16(x).dtype == torch.bfloat16
        assert seen == [torch.float32]  # the frozen bridge stays in float32
        assert training_forward(model, TrainConfig(), cpu, model.frozen_part, None)(x).dtype == torch.float32
    finally:
        hook.remove()
    from subcache.devices import autocast_dtype
    from subcache.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown precision 'fp8'; allowed: fp32, bf16"):
        autocast_dtype("fp8")


def test_fused_adamw_where_the_device_has_it(resnet_cache, resnet18, monkeypatch):
    from subcache import devices
    from subcache.errors import ConfigError
    from subcache.step import optimizer

    cache = subcache.open_cache(resnet_cache)
    model = TunedModel(resnet18, 6, (8,), 4, cache.sample_shape)
    cpu = torch.device("cpu")
    assert optimizer(model, subcache.TrainConfig(fused=True), cpu).defaults["fused"] is True
    assert not optimizer(model, subcache.TrainConfig(), cpu).defaults["fused"]  # default: CUDA only
    monkeypatch.setattr(devices, "fused_adamw_supported", lambda device: False)
    with pytest.raises(ConfigError, match="no fused AdamW for cpu; use --no-fused"):
        optimizer(model, subcache.TrainConfig(fused=True), cpu)


def test_cache_training_equals_image_training_on_the_gpu_code_path(resnet_cache, npz_path):
    """channels_last + fused AdamW (what CUDA runs by default), on the CPU in float32: still exact."""
    from subcache.train import train_reference

    backbone = subcache.load_backbone("resnet18", "none", image_size=32)
    config = subcache.TrainConfig(blocks="7", epochs=2, batch_size=32, seed=1, device="cpu", precision="fp32",
                                  channels_last=True, fused=True)
    trained = subcache.train(resnet_cache, config, backbone=backbone).model
    got = trained.task_state()
    reference, _, _ = train_reference(subcache.open_source(npz_path, "train"), backbone, 6, config, num_classes=4)
    assert trained.block(7).conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert reference.block(8).conv1.weight.is_contiguous()  # the frozen tail keeps its layout
    assert backbone.block(6).conv1.weight.is_contiguous()  # and so does the frozen bridge
    for key, value in reference.task_state().items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def half_cache(tmp_path_factory, npz_path, resnet18):
    out = str(tmp_path_factory.mktemp("half") / "h.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=("6",), model="resnet18", weights="none",
                                              data=npz_path, image_size=32, dtype="float16", limit=64),
                         backbone=resnet18)
    return subcache.open_cache(out)


def test_resident_tensors_stay_16_bit_when_float32_would_not_fit(half_cache, resnet18, monkeypatch):
    from subcache import devices as devices_module
    from subcache.train import make_loader

    cpu = torch.device("cpu")
    assert ActivationBank(half_cache, resnet18, cpu).dtype == torch.float32  # fits: float32
    bank = ActivationBank(half_cache, resnet18, cpu, budget=1)
    assert bank.dtype == torch.float16 and bank.at("train", 8).dtype == torch.float16
    model = TunedModel(resnet18, 6, (8,), 4, half_cache.sample_shape)
    y = half_cache.read_y("train")
    config = subcache.TrainConfig(blocks="8", loader="memory", device="cpu")
    assert make_loader(half_cache, config, model, None, y, cpu, ()).x.dtype == torch.float32
    monkeypatch.setattr(devices_module, "memory_budget", lambda device: 1)
    loader = make_loader(half_cache, config, model, None, y, cpu, ())
    assert loader.bridged and loader.x.dtype == torch.float16
    result = subcache.train(half_cache, subcache.TrainConfig(blocks="8", epochs=1, batch_size=16, loader="memory"),
                            subcache.TrainData(bank=bank), backbone=resnet18)  # 16-bit bank: float32 batches
    assert result.test_accuracy is not None


@pytest.mark.slow
def test_bf16_lands_within_1_5_points_of_fp32_on_real_weights_and_data(tmp_path):
    """EfficientNet-Lite0 (ImageNet) + Fashion-MNIST at 64 px, blocks 14-16, 1,000 training examples (the first
    1,000 of each split), on the CPU."""
    out = str(tmp_path / "fm.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=("14",), model="efficientnet_lite0",
                                              data="fashion-mnist", image_size=64, limit=1000, device="cpu"))
    accuracy = {}
    for precision in ("fp32", "bf16"):
        config = subcache.TrainConfig(blocks="14-16", epochs=10, batch_size=128, device="cpu",
                                      precision=precision)
        accuracy[precision] = subcache.train(out, config).test_accuracy
    print(f"Lite0 + Fashion-MNIST, blocks 14-16, 1,000 examples: {accuracy}")
    assert accuracy["fp32"] > 0.7
    assert abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.015


def test_the_cli_trains_on_the_gpu_code_path_on_cpu(resnet_cache, tmp_path):
    import json

    from click.testing import CliRunner

    from subcache.cli.main import main

    for command in ("train", "profile", "greedy", "al"):
        assert "--precision [fp32|bf16]" in CliRunner().invoke(main, [command, "--help"]).output
    r = CliRunner().invoke(main, ["train", "--cache", resnet_cache, "--blocks", "7-8", "--epochs", "3",
                                  "--batch-size", "32", "--lr", "3e-3", "--precision", "bf16", "--channels-last",
                                  "--fused", "--device", "cpu", "--out", str(tmp_path / "t"), "--json"])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "t" / "task.json").read_text())["config"]
    assert (saved["precision"], saved["channels_last"], saved["fused"]) == ("bf16", True, True)
    assert json.loads(r.stdout)["test_accuracy"] > 0.4
    r = CliRunner().invoke(main, ["train", "--cache", resnet_cache, "--blocks", "8", "--device", "tpu", "--out",
                                  str(tmp_path / "u")])
    assert r.exit_code != 0 and r.output.strip() == "Error: unknown device 'tpu'; allowed: auto, cpu, cuda, cuda:N"


def test_resident_dtype_never_keeps_dequantized_activations_as_int8():
    from subcache.loader import resident_dtype

    cpu = torch.device("cpu")
    assert resident_dtype(100, torch.int8, cpu, budget=1000) == torch.float32
    assert resident_dtype(100, torch.bfloat16, cpu, budget=10) == torch.bfloat16
    assert resident_dtype(100, torch.int8, cpu, budget=10) == torch.float16  # int8 codes dequantize to floats
