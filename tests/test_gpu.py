"""The CUDA path (skipped without a GPU): builds match the CPU's, training runs with bf16/channels_last."""
import pytest
import torch

import subcache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_build_matches_the_cpu_build(tmp_path, npz_path, resnet18):
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = str(tmp_path / f"{device}.zarr")
        subcache.build_cache(subcache.BuildConfig(out=outs[device], layers=("6",), model="resnet18",
                                                  weights="none", data=npz_path, image_size=32, dtype="float32",
                                                  device=device), backbone=resnet18)
    cpu, gpu = (subcache.open_cache(outs[d]).read_x("train") for d in ("cpu", "cuda"))
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_cuda_training_learns_and_keeps_frozen_statistics(resnet_cache):
    backbone = subcache.load_backbone("resnet18", "none", image_size=32)  # its own copy: it moves to the GPU
    before = {k: v.clone() for k, v in backbone.model.state_dict().items() if "running" in k}
    result = subcache.train(resnet_cache, subcache.TrainConfig(blocks="7-8", epochs=6, batch_size=32, lr=3e-3,
                                                               device="cuda"), backbone=backbone)
    assert result.test_accuracy > 0.5
    after = {k: v.cpu() for k, v in backbone.model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
