"""Tests of the augmentation whitelist (--aug-allow / --aug-deny)."""

import pytest
import torch

from stylegan2ada.augment import PRESETS, TRANSFORMS, AugmentPipe
from stylegan2ada.util import UserError
from taxogan_ext.augment_allow import NAMED_SETS, AugmentChoiceError, describe, resolve_augment_kwargs


def test_preset_alone_is_a_copy_of_the_preset():
    kw = resolve_augment_kwargs('bgc', None, None)
    assert kw == PRESETS['bgc']
    kw['xflip'] = 0
    assert PRESETS['bgc']['xflip'] == 1                              # the registry is not mutated


def test_preset_plus_allow_keeps_the_intersection_in_pipeline_order():
    kw = resolve_augment_kwargs('bgc', 'rotate, xflip,rotate90', None)
    assert list(kw) == ['xflip', 'rotate90', 'rotate'] and set(kw.values()) == {1}
    # noise is not part of bgc: allowing it adds nothing.
    assert resolve_augment_kwargs('bgc', 'xflip,noise', None) == {'xflip': 1}


def test_allow_alone_starts_from_all_transforms():
    assert resolve_augment_kwargs(None, 'noise,cutout', None) == {'noise': 1, 'cutout': 1}
    assert list(resolve_augment_kwargs(None, None, 'noise')) == [t for t in TRANSFORMS if t != 'noise']


def test_deny_removes_from_the_preset():
    kw = resolve_augment_kwargs('bgcfnc', None, 'noise,cutout')
    assert kw == PRESETS['bgcf']
    kw = resolve_augment_kwargs('bgc', 'leakfree-color', 'hue')
    assert list(kw) == ['xflip', 'rotate90', 'brightness', 'contrast', 'lumaflip', 'saturation']


def test_named_sets():
    assert NAMED_SETS['leakfree-geom'] == ('xflip', 'rotate90', 'rotate')
    assert list(resolve_augment_kwargs(None, 'leakfree-geom', None)) == ['xflip', 'rotate90', 'rotate']
    assert list(resolve_augment_kwargs(None, 'leakfree-color', None)) == [
        'xflip', 'rotate90', 'brightness', 'contrast', 'lumaflip', 'hue', 'saturation', 'imgfilter', 'noise', 'cutout']
    assert list(resolve_augment_kwargs('bgcfnc', 'LeakFree-Geom', 'rotate90')) == ['xflip', 'rotate']


def test_unknown_names_give_one_line_with_the_valid_names():
    assert issubclass(AugmentChoiceError, UserError)       # the command-line tools print it as one line
    with pytest.raises(AugmentChoiceError) as err:
        resolve_augment_kwargs('bgc', 'xflip,xflop', None)
    msg = str(err.value)
    assert '\n' not in msg and '--aug-allow' in msg and "'xflop'" in msg
    assert all(t in msg for t in TRANSFORMS) and all(s in msg for s in NAMED_SETS)
    with pytest.raises(AugmentChoiceError, match=r"--aug-deny: unknown augmentation 'blur'"):
        resolve_augment_kwargs('bgc', None, 'blur')
    with pytest.raises(AugmentChoiceError, match=r"--augpipe: unknown preset 'bgx'.*bgcfnc"):
        resolve_augment_kwargs('bgx', None, None)


def test_empty_results_are_errors():
    with pytest.raises(AugmentChoiceError, match='no augmentation left'):
        resolve_augment_kwargs('blit', 'noise', None)
    with pytest.raises(AugmentChoiceError, match='no augmentation left'):
        resolve_augment_kwargs('blit', None, 'xflip,rotate90,xint')
    with pytest.raises(AugmentChoiceError, match='no augmentation left'):
        resolve_augment_kwargs(None, ' , ', None)
    with pytest.raises(AugmentChoiceError, match='no augmentations chosen'):
        resolve_augment_kwargs(None, None, None)


def test_describe():
    assert describe(resolve_augment_kwargs(None, 'leakfree-geom', None)) == 'xflip, rotate90, rotate'
    assert describe(dict(noise=0.5, xflip=1, noise_std=0.3)) == 'xflip, noise=0.5'
    assert describe({}) == 'none'


def test_only_flips_ever_happen_when_only_xflip_is_allowed():
    torch.manual_seed(7)                                            # a fixed verdict for the 4.5-sigma bound
    pipe = AugmentPipe(**resolve_augment_kwargs('bgcfnc', 'xflip', None))
    pipe.p.fill_(1)
    n_total, n_flipped = 0, 0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand([200, 3, 8, 8], generator=g) * 2 - 1
        out = pipe(x)
        same = (out == x).flatten(1).all(dim=1)
        mirror = (out == x.flip(3)).flatten(1).all(dim=1)
        assert (same | mirror).all()                                # nothing but the image or its exact mirror
        n_total += len(x)
        n_flipped += int(mirror.sum())
    assert abs(n_flipped - n_total / 2) <= 4.5 * (n_total / 4) ** 0.5, n_flipped  # and both occur, ~half each
