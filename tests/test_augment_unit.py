"""Feature-space augmentation, exactly: which samples are flipped, where each crop lands, on which device the
draws and indices are made (each test kills mutants that `examples/mutation.sh augment` found surviving)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from subcache.augment import apply, batch_crop, batch_flip, default_pad, mirror, parse_augment
from subcache.errors import ConfigError


def test_parse_augment_names_and_message():
    assert parse_augment(None) == ()
    assert parse_augment(" flip , crop ") == ("flip", "crop")
    assert parse_augment("none") == () and parse_augment("flip,,none") == ("flip",)
    assert parse_augment(("crop", "none")) == ("crop",)
    with pytest.raises(ConfigError) as e:
        parse_augment("flip,rotate,shear")
    assert str(e.value) == "unknown augmentation 'rotate'; allowed: flip, crop, flip,crop or none"


def test_mirror_flips_columns_of_maps_and_of_the_patch_grid_keeping_prefix_tokens():
    maps = torch.arange(2 * 3 * 2 * 4.).view(2, 3, 2, 4)
    assert torch.equal(mirror(maps), maps[..., [3, 2, 1, 0]])
    tokens = torch.arange(2 * 11 * 3.).view(2, 11, 3)  # 2 prefix tokens, then a 3 x 3 grid row by row
    grid = [2 + 3 * r + c for r in range(3) for c in (2, 1, 0)]
    assert torch.equal(mirror(tokens), tokens[:, [0, 1, *grid]])


def _reference_flip(x, seed, flipped):
    mask = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.5
    assert 0 < mask.sum() < x.shape[0]  # both kinds occur
    return torch.stack([flipped[i] if m else x[i] for i, m in enumerate(mask.tolist())])


def test_batch_flip_mirrors_the_drawn_half_or_uses_the_exact_views():
    x = torch.randn(16, 2, 3, 5)
    got = batch_flip(x, torch.Generator().manual_seed(3))
    assert torch.equal(got, _reference_flip(x, 3, mirror(x)))
    views = torch.randn(16, 2, 3, 5)
    assert torch.equal(batch_flip(x, torch.Generator().manual_seed(3), views), _reference_flip(x, 3, views))


def _reference_crop(x, seed, pad):
    gen = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@pytest.mark.parametrize("shape,pad,used", [((6, 3, 4, 9), 5, 3), ((6, 3, 9, 4), 5, 3), ((6, 2, 5, 5), 2, 2),
                                            ((6, 2, 7, 8), 1, 1)])
def test_batch_crop_translates_each_sample_by_its_drawn_offset(shape, pad, used):
    x = torch.randn(*shape)
    got = batch_crop(x, torch.Generator().manual_seed(5), pad)
    assert torch.equal(got, _reference_crop(x, 5, used))


def test_batch_crop_without_room_returns_the_maps_and_refuses_tokens():
    x = torch.randn(2, 3, 1, 6)
    assert batch_crop(x, torch.Generator(), 4) is x and batch_crop(torch.randn(2, 3, 4, 4), torch.Generator(), 0).shape
    with pytest.raises(ConfigError) as e:
        batch_crop(torch.randn(2, 5, 8), torch.Generator(), 1)
    assert str(e.value) == "crop needs a convolutional cache (N, C, H, W); token caches support flip only"


def test_draws_follow_the_generator_and_indices_the_data_whatever_the_default_device():
    """On CUDA the generator and the maps live on the GPU while factories default to the CPU: every tensor an
    augmentation makes must name its device. A `meta` default device stands in for that here."""
    x, views = torch.randn(16, 2, 5, 7), torch.randn(16, 2, 5, 7)
    with torch.device("meta"):
        flipped = batch_flip(x, torch.Generator().manual_seed(3), views)
        cropped = batch_crop(x, torch.Generator().manual_seed(5), 2)
        both = apply(x, ("flip", "crop"), torch.Generator().manual_seed(7), views, pad=2)
    assert torch.equal(flipped, _reference_flip(x, 3, views))
    assert torch.equal(cropped, _reference_crop(x, 5, 2))
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(both, batch_crop(batch_flip(x, gen, views), gen, 2))


def test_apply_runs_only_the_named_augmentations_in_order():
    x = torch.randn(8, 2, 6, 6)
    assert apply(x, (), torch.Generator()) is x
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(apply(x, ("crop",), torch.Generator().manual_seed(1), pad=2), batch_crop(x, gen, 2))
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(apply(x, ("flip",), torch.Generator().manual_seed(1)), batch_flip(x, gen))
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(apply(x, ("crop", "flip"), torch.Generator().manual_seed(1)),
                       batch_crop(batch_flip(x, gen), gen, 1))  # default pad: 1


def test_default_pad_is_an_eighth_of_the_side_at_least_one():
    assert [default_pad((4, s, s)) for s in (1, 7, 8, 15, 16, 40)] == [1, 1, 1, 1, 2, 5]
    assert default_pad((4, 9, 24)) == 3 and default_pad((10, 4)) == 0


def test_maps_on_another_device_than_the_generator_stay_there():
    """A CPU generator with maps elsewhere (`meta` stands in for CUDA): the drawn mask and offsets move to the maps'
    device before they meet them."""
    x, views = torch.randn(4, 2, 5, 7, device="meta"), torch.randn(4, 2, 5, 7, device="meta")
    gen = torch.Generator().manual_seed(0)
    assert batch_flip(x, gen).device == x.device and batch_flip(x, gen, views).device == x.device
    assert batch_crop(x, gen, 2).device == x.device
