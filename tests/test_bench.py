"""`subcache bench train` and `bench profile` run end to end on a tiny backbone and report MFU: achieved FLOP/s (the
training FLOPs they did, by the shared accounting) ÷ the device's peak for the precision used, the peak named."""
import pytest
import torch

from subcache.backbones import load_backbone
from subcache.bench import BenchConfig, bench_profile, bench_train
from subcache.devices import GPU_PEAKS, peak_flops
from subcache.selection.flops import profile_flops, training_flops
from subcache.selection.windows import windows

SMALL = dict(model="resnet18", weights="none", image_size=32, limit=64, layer="7", blocks="7-8", epochs=1,
             batch_size=32, device="cpu")


def test_bench_train_reports_mfu_from_the_training_flops_it_did(npz_path, monkeypatch):
    monkeypatch.setattr("subcache.bench.peak_flops", lambda device, precision="fp32": (1e12, "a stand-in peak"))
    result = bench_train(BenchConfig(data=npz_path, **SMALL), progress=False)
    backbone = load_backbone("resnet18", "none", image_size=32)
    per_sample = training_flops(backbone, (7, 8))[1]
    achieved = per_sample * result["device_resident_samples_per_second"]  # FLOPs per sample × samples/s
    assert result["achieved_flops_per_second"] == pytest.approx(achieved, rel=1e-9)
    assert result["mfu"] == pytest.approx(achieved / 1e12) and result["peak"] == "a stand-in peak"


def test_bench_profile_reports_mfu_over_the_whole_arm(npz_path, monkeypatch):
    monkeypatch.setattr("subcache.bench.peak_flops", lambda device, precision="fp32": (1e12, "a stand-in peak"))
    result = bench_profile(BenchConfig(data=npz_path, **SMALL), progress=False)
    backbone = load_backbone("resnet18", "none", image_size=32)
    from_cache = profile_flops(backbone, windows(7, 8, 1), 1, result["images"], result["images"])[1]
    assert result["achieved_flops_per_second"] == pytest.approx(from_cache / result["subcache_seconds"], rel=1e-9)
    assert result["mfu"] == pytest.approx(result["achieved_flops_per_second"] / 1e12)
    assert result["windows"] == ["7", "8"] and 0 <= result["setup_fraction"] <= 1


def test_the_peak_is_the_vendors_for_known_gpus_and_measured_elsewhere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(torch.device("cuda", 0), "bf16") == GPU_PEAKS["H200"]["bf16"]
    assert peak_flops(torch.device("cuda", 0), "fp32") == GPU_PEAKS["H200"]["fp32"]
    rate, name = peak_flops(torch.device("cpu"))
    assert rate > 1e8 and name.startswith("measured float32 1024x1024 matmul rate (cpu")
