"""ImageFolderDataset and InfiniteSampler: zip and folder, RGB and grayscale, labels, subsets, mirroring, errors."""

import io
import json
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from stylegan2ada.dataset import DatasetError, ImageFolderDataset, InfiniteSampler


def _png_bytes(array):
    """uint8 [H, W] or [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format='PNG')
    return buf.getvalue()


def _random_images(n, size=8, channels=3, seed=0):
    rnd = np.random.RandomState(seed)
    shape = [n, size, size] + ([channels] if channels == 3 else [])
    return rnd.randint(0, 256, size=shape, dtype=np.uint8)


def _write_zip(path, files):
    with zipfile.ZipFile(path, 'w') as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return str(path)


def _write_folder(root, files):
    for name, data in files.items():
        dest = root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return str(root)


def _labelled_files(images, classes, label_names=None):
    files = {f'img{i:08d}.png': _png_bytes(img) for i, img in enumerate(images)}
    meta = {'labels': [[f'img{i:08d}.png', int(c)] for i, c in enumerate(classes)]}
    if label_names is not None:
        meta['label_names'] = label_names
    files['dataset.json'] = json.dumps(meta).encode()
    return files


def _one_line(exc_info):
    message = str(exc_info.value)
    assert '\n' not in message
    return message


# ----------------------------------------------------------------------------
# Reading.

def test_zip_rgb_with_onehot_labels(tmp_path):
    images = _random_images(6)
    classes = [0, 2, 1, 2, 0, 1]
    path = _write_zip(tmp_path / 'Calanoida.zip', _labelled_files(images, classes, ['a', 'b', 'c']))
    ds = ImageFolderDataset(path, use_labels=True)
    assert (ds.name, len(ds), ds.image_shape, ds.num_channels, ds.resolution) == ('Calanoida', 6, [3, 8, 8], 3, 8)
    assert (ds.label_dim, ds.label_shape, ds.has_labels, ds.has_onehot_labels) == (3, [3], True, True)
    assert ds.label_names == ['a', 'b', 'c']
    for i in range(6):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (3, 8, 8)
        np.testing.assert_array_equal(image, images[i].transpose(2, 0, 1))
        expected = np.zeros(3, dtype=np.float32)
        expected[classes[i]] = 1
        np.testing.assert_array_equal(label, expected)
        assert label.dtype == np.float32
        assert ds.get_details(i) == dict(raw_idx=i, xflip=False, raw_label=classes[i])
    # Labels off: label_dim 0, empty labels.
    plain = ImageFolderDataset(path)
    assert plain.label_dim == 0 and not plain.has_labels and plain[0][1].shape == (0,)


def test_folder_grayscale_recursive(tmp_path):
    images = _random_images(4, size=16, channels=1, seed=1)
    files = {f'sub{i % 2}/deeper/x{i}.png': _png_bytes(img) for i, img in enumerate(images)}
    files['notes.txt'] = b'not an image'
    root = _write_folder(tmp_path / 'gray', files)
    ds = ImageFolderDataset(root, resolution=16)
    assert (len(ds), ds.image_shape) == (4, [1, 16, 16])
    # Sorted by relative path: sub0/deeper/x0, sub0/deeper/x2, sub1/deeper/x1, sub1/deeper/x3.
    assert ds.image_fnames == ['sub0/deeper/x0.png', 'sub0/deeper/x2.png', 'sub1/deeper/x1.png', 'sub1/deeper/x3.png']
    for item, src in zip(range(4), [0, 2, 1, 3]):
        np.testing.assert_array_equal(ds[item][0], images[src][np.newaxis])


def test_jpeg_and_mixed_modes_read_as_rgb(tmp_path):
    gray = _random_images(1, size=8, channels=1)[0]
    ramp = np.arange(8, dtype=np.uint8) * 16
    color = np.stack([ramp[None, :].repeat(8, 0), ramp[:, None].repeat(8, 1), np.full([8, 8], 100, np.uint8)], axis=2)
    buf = io.BytesIO()
    PIL.Image.fromarray(color).save(buf, format='JPEG', quality=95)
    root = _write_folder(tmp_path / 'mixed', {'a.png': _png_bytes(gray), 'b.JPG': buf.getvalue()})
    ds = ImageFolderDataset(root)
    assert ds.image_shape == [3, 8, 8]
    np.testing.assert_array_equal(ds[0][0], np.repeat(gray[np.newaxis], 3, axis=0))  # gray -> equal RGB channels
    assert np.abs(ds[1][0].astype(int) - color.transpose(2, 0, 1)).mean() < 4       # JPEG is lossy, close


def test_label_names_only_from_dataset_json(tmp_path):
    # The engine reads class names from dataset.json alone; a datasets manifest beside the zip is the extension's
    # business (taxogan_ext.taxon_metrics reads it for datasets written without label_names).
    images = _random_images(3)
    manifest = {'format': 'taxogan-datasets/1', 'taxa': {
        'Copepoda': {'rank': 'class', 'parent': None, 'dataset': 'Copepoda.zip', 'labels': ['Calanoida', 'Cyclopoida', 'Harpacticoida']}}}
    (tmp_path / 'manifest.json').write_text(json.dumps(manifest))
    _write_zip(tmp_path / 'Copepoda.zip', _labelled_files(images, [0, 1, 1]))
    ds = ImageFolderDataset(str(tmp_path / 'Copepoda.zip'), use_labels=True)
    assert ds.label_names is None and ds.label_dim == 2
    np.testing.assert_array_equal(ds.get_label(2), [0, 1])
    names = ['Calanoida', 'Cyclopoida', 'Harpacticoida']
    _write_zip(tmp_path / 'Copepoda.zip', _labelled_files(images, [0, 1, 1], label_names=names))
    ds = ImageFolderDataset(str(tmp_path / 'Copepoda.zip'), use_labels=True)
    assert ds.label_names == names
    assert ds.label_dim == 3   # the class list sets the width even though class 2 has no image here
    np.testing.assert_array_equal(ds.get_label(2), [0, 1, 0])


def test_max_size_subset_is_deterministic(tmp_path):
    images = _random_images(20, size=4)
    path = _write_zip(tmp_path / 'd.zip', {f'{i:02d}.png': _png_bytes(img) for i, img in enumerate(images)})
    a = ImageFolderDataset(path, max_size=7, random_seed=3)
    b = ImageFolderDataset(path, max_size=7, random_seed=3)
    c = ImageFolderDataset(path, max_size=7, random_seed=4)
    raw_a = [a.get_details(i)['raw_idx'] for i in range(len(a))]
    raw_b = [b.get_details(i)['raw_idx'] for i in range(len(b))]
    raw_c = [c.get_details(i)['raw_idx'] for i in range(len(c))]
    assert len(a) == 7 and raw_a == raw_b and raw_a == sorted(set(raw_a))
    assert raw_a != raw_c
    for i, raw in enumerate(raw_a):
        np.testing.assert_array_equal(a[i][0], images[raw].transpose(2, 0, 1))
    assert len(ImageFolderDataset(path, max_size=100)) == 20  # larger than the dataset: everything


def test_xflip_doubles_and_mirrors(tmp_path):
    images = _random_images(3)
    path = _write_zip(tmp_path / 'd.zip', _labelled_files(images, [0, 1, 0]))
    ds = ImageFolderDataset(path, xflip=True, use_labels=True)
    assert len(ds) == 6
    for i in range(3):
        image, label = ds[i]
        flipped, flipped_label = ds[i + 3]
        np.testing.assert_array_equal(flipped, image[:, :, ::-1])
        np.testing.assert_array_equal(flipped_label, label)
        assert ds.get_details(i + 3) == dict(raw_idx=i, xflip=True, raw_label=[0, 1, 0][i])


def test_content_hash_init_kwargs_and_pickle(tmp_path):
    images = _random_images(4)
    files = _labelled_files(images, [0, 1, 0, 1])
    zip_ds = ImageFolderDataset(_write_zip(tmp_path / 'd.zip', files), use_labels=True, cache=False)
    dir_ds = ImageFolderDataset(_write_folder(tmp_path / 'd', files), use_labels=True)
    assert zip_ds.content_hash() == dir_ds.content_hash()   # same names and bytes -> same hash
    assert len(zip_ds.content_hash()) == 64
    files['img00000002.png'] = _png_bytes(images[2] ^ 1)
    changed = ImageFolderDataset(_write_zip(tmp_path / 'e.zip', files))
    assert changed.content_hash() != zip_ds.content_hash()

    again = ImageFolderDataset(**zip_ds.init_kwargs)
    assert again.init_kwargs == zip_ds.init_kwargs and again.resolution == 8 and again.label_dim == 2

    _ = zip_ds[0]  # opens the zip in this process
    clone = pickle.loads(pickle.dumps(zip_ds))
    for i in range(4):
        np.testing.assert_array_equal(clone[i][0], zip_ds[i][0])
    loader = torch.utils.data.DataLoader(zip_ds, batch_size=2, num_workers=2)
    batches = torch.cat([b[0] for b in loader])
    np.testing.assert_array_equal(batches.numpy(), np.stack([zip_ds[i][0] for i in range(4)]))


# ----------------------------------------------------------------------------
# Errors: one line naming the file and the problem.

def test_error_missing_and_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError) as exc:
        ImageFolderDataset(str(tmp_path / 'nope.zip'))
    assert 'nope.zip' in _one_line(exc) and 'no such file' in str(exc.value)
    text = tmp_path / 'x.zip'
    text.write_text('hello')
    with pytest.raises(DatasetError) as exc:
        ImageFolderDataset(str(text))
    assert 'x.zip' in _one_line(exc) and 'not a .zip file or a folder' in str(exc.value)


def test_error_no_images(tmp_path):
    path = _write_zip(tmp_path / 'empty.zip', {'readme.txt': b'x'})
    with pytest.raises(DatasetError) as exc:
        ImageFolderDataset(path)
    assert 'empty.zip' in _one_line(exc) and 'no images' in str(exc.value)


@pytest.mark.parametrize('bad, expected', [
    (np.zeros([8, 4, 3], np.uint8), 'square'),
    (np.zeros([4, 4, 3], np.uint8), 'same size'),
    (np.zeros([12, 12, 3], np.uint8), 'power of two'),
    (b'\x89PNG\r\n\x1a\ngarbage', 'unreadable'),
])
def test_error_bad_image_names_the_file(tmp_path, bad, expected):
    files = {f'img{i}.png': _png_bytes(img) for i, img in enumerate(_random_images(2))}
    files['img5_bad.png'] = bad if isinstance(bad, bytes) else _png_bytes(bad)
    for maker, where in [(_write_zip, tmp_path / 'bad.zip'), (_write_folder, tmp_path / 'badfolder')]:
        with pytest.raises(DatasetError) as exc:
            ImageFolderDataset(maker(where, files))
        message = _one_line(exc)
        assert 'img5_bad.png' in message and expected in message


def test_error_wrong_resolution(tmp_path):
    path = _write_zip(tmp_path / 'd.zip', {'a.png': _png_bytes(_random_images(1)[0])})
    with pytest.raises(DatasetError) as exc:
        ImageFolderDataset(path, resolution=16)
    assert 'a.png' in _one_line(exc) and 'expected 16x16' in str(exc.value)


@pytest.mark.parametrize('meta, expected', [
    (b'{not json', 'not valid JSON'),
    (json.dumps({'labels': 'x'}).encode(), 'must be a list'),
    (json.dumps({'nolabels': []}).encode(), '"labels" key'),
    (json.dumps({'labels': [['img0.png', 0], ['img1.png', 1], ['ghost.png', 1]]}).encode(), 'ghost.png'),
    (json.dumps({'labels': [['img0.png', 0]]}).encode(), 'no label for img1.png'),
    (json.dumps({'labels': [['img0.png', 0], ['img1.png', -1]]}).encode(), 'class index'),
    (json.dumps({'labels': [['img0.png', 0], ['img1.png', 3]], 'label_names': ['a', 'b']}).encode(), 'out of range'),
])
def test_error_bad_dataset_json(tmp_path, meta, expected):
    files = {f'img{i}.png': _png_bytes(img) for i, img in enumerate(_random_images(2))}
    files['dataset.json'] = meta
    with pytest.raises(DatasetError) as exc:
        ImageFolderDataset(_write_zip(tmp_path / 'lab.zip', files), use_labels=True)
    message = _one_line(exc)
    assert 'lab.zip:dataset.json' in message and expected in message


# ----------------------------------------------------------------------------
# Sampler.

def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_infinite_sampler_epochs_and_replicas():
    data = list(range(10))
    assert _take(iter(InfiniteSampler(data, shuffle=False)), 25) == list(range(10)) * 2 + list(range(5))
    stream = _take(iter(InfiniteSampler(data, seed=5)), 30)
    assert stream[:10] != data                                  # shuffled
    assert stream[10:20] != stream[:10]                         # the order keeps changing
    counts = np.bincount(_take(iter(InfiniteSampler(data, seed=5)), 2000), minlength=10)
    assert counts.min() >= 150 and counts.max() <= 250          # every item about 200 times
    assert stream == _take(iter(InfiniteSampler(data, seed=5)), 30)   # same seed, same stream
    r0 = _take(iter(InfiniteSampler(data, rank=0, num_replicas=2, seed=5)), 15)
    r1 = _take(iter(InfiniteSampler(data, rank=1, num_replicas=2, seed=5)), 15)
    assert r0 == stream[0::2] and r1 == stream[1::2]   # replicas partition one common stream
    with pytest.raises(ValueError):
        InfiniteSampler(data, rank=2, num_replicas=2)
