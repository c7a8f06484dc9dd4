"""The CUDA path (skipped without a GPU): the whole way build → train → score → profile → predict on the GPU;
CUDA builds equal CPU builds within float16 rounding; cache training equals image training on CUDA in fp32."""
import pytest
import torch

import subcache
from subcache.train import train_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def build(out, npz_path, device, dtype="float16"):
    backbone = subcache.load_backbone("resnet18", "none", image_size=32)  # its own copy: it moves to the device
    subcache.build_cache(subcache.BuildConfig(out=str(out), layers=("6",), model="resnet18", weights="none",
                                              data=npz_path, image_size=32, dtype=dtype, device=device),
                         backbone=backbone)
    return subcache.open_cache(str(out))


def test_the_whole_way_on_cuda(tmp_path, npz_path):
    cache = build(tmp_path / "c.zarr", npz_path, "cuda")
    backbone = subcache.load_backbone("resnet18", "none", image_size=32)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items() if "running" in k}
    task = str(tmp_path / "task")
    result = subcache.train(cache, subcache.TrainConfig(blocks="7-8", epochs=6, batch_size=32, lr=3e-3,
                                                        device="cuda"), out=task, backbone=backbone)
    assert result.test_accuracy > 0.5
    after = {k: v.cpu() for k, v in backbone.model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen statistics never move
    streamed = subcache.train(cache, subcache.TrainConfig(blocks="7-8", epochs=2, batch_size=32, device="cuda",
                                                          loader="stream"), backbone=backbone)
    assert streamed.loader == "stream" and streamed.num_samples == len(cache.split("train"))
    scores = subcache.score_pool(cache, task, device="cuda", backbone=backbone)
    assert len(scores.ids) == len(cache.split("train"))
    profile = subcache.profile_blocks(cache, subcache.ProfileConfig(
        blocks="7-8", train=subcache.TrainConfig(epochs=1, batch_size=32, device="cuda")), backbone=backbone)
    assert {r["blocks"] for r in profile.rows} >= {"7", "8"}  # two windows (and the probe)
    preds = subcache.predict([task], npz_path, device="cuda", backbone=backbone)
    assert preds.accuracy["task"] == pytest.approx(result.test_accuracy, abs=0.03)


def test_cuda_build_matches_the_cpu_build_within_float16_rounding(tmp_path, npz_path, monkeypatch):
    # cuDNN convolutions default to TF32 (10-bit mantissa, like the float16 store): measured on an H200, up to 1.25
    # float16 ulps apart from the CPU. Exact float32 convolutions must agree to one ulp of the stored float16.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu, gpu = (build(tmp_path / f"{d}.zarr", npz_path, d).read_x("train").float() for d in ("cpu", "cuda"))
    torch.testing.assert_close(gpu, cpu, rtol=2 ** -10, atol=1e-3)


def test_cache_training_equals_image_training_on_cuda_in_fp32(tmp_path, npz_path):
    cache = build(tmp_path / "f.zarr", npz_path, "cuda", dtype="float32")
    backbone = subcache.load_backbone("resnet18", "none", image_size=32)
    config = subcache.TrainConfig(blocks="6-7", epochs=2, batch_size=32, seed=1, device="cuda", precision="fp32")
    got = subcache.train(cache, config, backbone=backbone).model.task_state()
    reference, _, _ = train_reference(subcache.open_source(npz_path, "train"), backbone, 6, config, 4, device="cuda")
    for key, value in reference.task_state().items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
