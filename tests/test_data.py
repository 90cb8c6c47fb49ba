"""Tests for ddpm_jax/data.py: the grain pipeline over TFDS (mocked) and digits.

Every expected image is computed independently in NumPy from the raw source
(tfds.data_source under tfds.testing.mock_data, or sklearn's load_digits).
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from ddpm_jax import data

_NUM_MOCK = 24  # mock examples per split; divisible by 2, 3, 4, 6 and 8.


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=_NUM_MOCK,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def _take(iterator, count=None):
    return [batch for _, batch in zip(range(count or 10**9), iterator)]


def _expected_images(name, split):
    """float64 [N, H, W, C]: the raw uint8 source scaled by x / 127.5 - 1."""
    source = tfds.data_source(data.DATASETS[name].tfds_name, split=split)
    return np.stack([source[i]['image'].astype(np.float64) / 127.5 - 1
                     for i in range(len(source))])


def _indices(images, expected, allow_flip=False):
    """Source index of each image in images [N, H, W, C] (asserts it exists)."""
    found = []
    for image in images:
        same = np.all(np.abs(expected - image) < 1e-6, axis=(1, 2, 3))
        if allow_flip:
            same |= np.all(np.abs(expected[:, :, ::-1] - image) < 1e-6,
                           axis=(1, 2, 3))
        assert same.sum() >= 1, 'image not found in the source'
        found.append(int(np.argmax(same)))
    return np.array(found)


# ------------------------------------------------------------------ TFDS path


@pytest.mark.parametrize('name,shape', [('cifar10', (32, 32, 3)),
                                        ('mnist', (28, 28, 1))])
def test_tfds_one_epoch_is_a_permutation_of_the_scaled_source(
    mock_tfds, name, shape):
    del mock_tfds
    batches = _take(data.get_dataset(name, 'train', batch_size=5, seed=0,
                                     num_epochs=1, random_flip=False))
    assert len(batches) == _NUM_MOCK // 5  # the partial batch is dropped
    for batch in batches:
        assert batch['image'].shape == (5, *shape)
        assert batch['image'].dtype == np.float32
        assert batch['label'].dtype == np.int32 and batch['label'].shape == (5,)
        assert batch['image'].min() >= -1 and batch['image'].max() <= 1

    full = _take(data.get_dataset(name, 'train', batch_size=4, seed=0,
                                  num_epochs=1, random_flip=False))
    images = np.concatenate([b['image'] for b in full])
    labels = np.concatenate([b['label'] for b in full])
    order = _indices(images, _expected_images(name, 'train'))
    assert sorted(order) == list(range(_NUM_MOCK))
    assert not np.array_equal(order, np.arange(_NUM_MOCK))  # shuffled
    source = tfds.data_source(name, split='train')
    np.testing.assert_array_equal(labels, [source[i]['label'] for i in order])


def test_tfds_same_seed_same_batches_other_seed_other_order(mock_tfds):
    del mock_tfds
    def images(seed):
        it = data.get_dataset('cifar10', 'train', batch_size=4, seed=seed)
        return np.concatenate([b['image'] for b in _take(it, 6)])
    first, again, other = images(3), images(3), images(4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_tfds_every_epoch_is_reshuffled(mock_tfds):
    del mock_tfds
    it = data.get_dataset('mnist', 'train', batch_size=_NUM_MOCK, seed=0,
                          num_epochs=2)
    epochs = _take(it)
    assert len(epochs) == 2
    expected = _expected_images('mnist', 'train')
    first, second = (_indices(e['image'], expected) for e in epochs)
    assert sorted(first) == sorted(second) == list(range(_NUM_MOCK))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize('shard_count', [2, 5])
def test_tfds_shards_are_disjoint_and_equal_in_one_epoch(mock_tfds, shard_count):
    del mock_tfds
    per_shard = _NUM_MOCK // shard_count  # 5 shards drop 24 % 5 = 4 examples
    expected = _expected_images('cifar10', 'train')
    shards = []
    for index in range(shard_count):
        it = data.get_dataset('cifar10', 'train', batch_size=1, seed=0,
                              shard_index=index, shard_count=shard_count,
                              num_epochs=1, random_flip=False)
        images = np.concatenate([b['image'] for b in _take(it)])
        assert len(images) == per_shard  # equal steps on every process
        shards.append(set(_indices(images, expected)))
    union = set().union(*shards)
    assert sum(len(s) for s in shards) == len(union) == per_shard * shard_count


@pytest.mark.parametrize('shard_count,num_epochs', [(2, None), (4, None),
                                                   (3, 2)])
def test_global_batches_do_not_depend_on_the_process_count(
    mock_tfds, shard_count, num_epochs):
    """Process p's batch k is rows [p*b, (p+1)*b) of one process's batch k.

    With flips on, so the per-example randomness is checked too; global
    batches of 3 x shard_count rows straddle the 24-example epochs.
    """
    del mock_tfds
    b = 3
    kwargs = dict(seed=3, num_epochs=num_epochs, random_flip=True)
    single = _take(data.get_dataset('cifar10', 'train',
                                    batch_size=b * shard_count, **kwargs), 9)
    parts = [_take(data.get_dataset('cifar10', 'train', batch_size=b,
                                    shard_index=p, shard_count=shard_count,
                                    **kwargs), 9)
             for p in range(shard_count)]
    if num_epochs is not None:  # 48 examples: 5 whole global batches of 9
        assert len(single) == 5
        assert all(len(part) == len(single) for part in parts)
    for k, whole in enumerate(single):
        for key in ('image', 'label'):
            np.testing.assert_array_equal(
                np.concatenate([part[k][key] for part in parts]), whole[key])


def test_tfds_flip_is_the_w_reversal_of_the_same_example(mock_tfds):
    del mock_tfds
    expected = _expected_images('cifar10', 'train')
    def epoch(random_flip):
        it = data.get_dataset('cifar10', 'train', batch_size=_NUM_MOCK, seed=7,
                              num_epochs=1, random_flip=random_flip)
        return _take(it)[0]['image']
    plain, flipped = epoch(False), epoch(True)
    # Flips do not change the order: the same positions hold the same index.
    order = _indices(plain, expected)
    np.testing.assert_array_equal(order,
                                  _indices(flipped, expected, allow_flip=True))
    is_flipped = np.array([
        np.allclose(f, expected[i][:, ::-1], atol=1e-6)
        and not np.allclose(f, expected[i], atol=1e-6)
        for f, i in zip(flipped, order)])
    unflipped = np.all(np.abs(flipped - plain) < 1e-6, axis=(1, 2, 3))
    np.testing.assert_array_equal(is_flipped, ~unflipped)
    assert 0 < is_flipped.sum() < _NUM_MOCK  # P(fail) = 2 * 2**-24
    assert data.DATASETS['cifar10'].random_flip
    assert not data.DATASETS['mnist'].random_flip


@pytest.mark.parametrize('name', ['celeb_a', 'lsun/church_outdoor'])
def test_tfds_crop_and_resize_to_image_size(mock_tfds, name):
    del mock_tfds
    batch = next(data.get_dataset(name, 'train', batch_size=3, seed=0,
                                  image_size=12))
    assert batch['image'].shape == (3, 12, 12, 3)
    assert batch['image'].min() >= -1 and batch['image'].max() <= 1
    np.testing.assert_array_equal(batch['label'], 0)
    assert data.image_shape(name, 12) == (12, 12, 3)


def test_center_crop_takes_the_central_square_without_resampling():
    rng = np.random.default_rng(0)
    tall = rng.integers(0, 256, (47, 17, 3), dtype=np.uint8)
    np.testing.assert_array_equal(data.center_crop_resize(tall, 17),
                                  tall[15:32])
    wide = rng.integers(0, 256, (10, 13, 1), dtype=np.uint8)
    np.testing.assert_array_equal(data.center_crop_resize(wide, 10),
                                  wide[:, 1:11])


def test_resize_keeps_constants_and_averages_a_smooth_ramp():
    constant = np.full((40, 60, 3), 77, np.uint8)
    np.testing.assert_array_equal(data.center_crop_resize(constant, 8), 77)
    # A linear ramp downsampled 64 -> 16: antialiased resampling gives the
    # mean of each 4-pixel block (exact for a linear signal, up to rounding
    # and the border where the kernel is cut).
    ramp = np.tile(np.arange(64, dtype=np.float64)[None, :] * 4, (64, 1))
    image = np.round(ramp).astype(np.uint8)[..., None]
    out = data.center_crop_resize(image, 16)[..., 0].astype(np.float64)
    block_mean = ramp.reshape(16, 4, 16, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(out[:, 1:-1], block_mean[:, 1:-1], atol=1)


def test_not_prepared_dataset_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.get_dataset('cifar10', 'train', batch_size=2, seed=0,
                         data_dir=str(tmp_path))
    message = str(error.value)
    for part in ['cifar10', str(tmp_path), 'download_and_prepare',
                 'file_format="array_record"', 'ddpm_jax[tensorflow]']:
        assert part in message
    with pytest.raises(FileNotFoundError, match='download_and_prepare'):
        data.load_split_array('mnist', 'test', data_dir=str(tmp_path))


# ---------------------------------------------------------- offline: digits


def _sklearn_digits_scaled():
    """float64 [1797, 8, 8, 1]: round(v * 255 / 16) / 127.5 - 1, in NumPy."""
    raw = sk_datasets.load_digits().images.astype(np.float64)
    return (np.round(raw * 255 / 16) / 127.5 - 1)[..., None]


def test_digits_splits_match_sklearn_exactly():
    expected = _sklearn_digits_scaled()
    train = data.load_split_array('digits', 'train')
    test = data.load_split_array('digits', 'test')
    assert train.dtype == np.float32 and train.shape == (1500, 8, 8, 1)
    assert test.shape == (297, 8, 8, 1)
    # The splits are the first 1500 and the last 297 examples: disjoint and
    # together the whole dataset.
    np.testing.assert_allclose(np.concatenate([train, test]), expected,
                               rtol=0, atol=1e-7)
    assert train.min() == -1 and train.max() == 1
    first_test = data.load_split_array('digits', 'test', max_examples=5)
    np.testing.assert_allclose(first_test, expected[1500:1505], atol=1e-7)


def test_digits_batches_hold_unflipped_examples_with_their_labels():
    expected = _sklearn_digits_scaled()[:1500]
    targets = sk_datasets.load_digits().target[:1500]
    batch = next(data.get_dataset('digits', 'train', batch_size=64, seed=1))
    assert batch['image'].shape == (64, 8, 8, 1)
    # Digits has duplicate images: the label must be one of the matches'.
    for image, label in zip(batch['image'], batch['label']):
        same = np.all(np.abs(expected - image) < 1e-6, axis=(1, 2, 3))
        assert label in targets[same]


def test_digits_resume_at_start_step_continues_the_stream():
    kwargs = dict(batch_size=100, seed=5, shard_index=1, shard_count=2)
    full = _take(data.get_dataset('digits', 'train', **kwargs), 12)
    resumed = _take(data.get_dataset('digits', 'train', start_step=7,
                                     **kwargs), 5)
    for a, b in zip(full[7:], resumed):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])

    # The grain iterator state is an alternative way to resume.
    it = data.get_dataset('digits', 'train', **kwargs)
    _take(it, 3)
    state = it.get_state()
    fresh = data.get_dataset('digits', 'train', **kwargs)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)['image'], full[3]['image'])


def test_digits_different_seeds_give_different_orders():
    a = next(data.get_dataset('digits', 'train', batch_size=16, seed=0))
    b = next(data.get_dataset('digits', 'train', batch_size=16, seed=1))
    assert not np.array_equal(a['image'], b['image'])


# -------------------------------------------------------------- toy 2-D sets


@pytest.mark.parametrize('name,make', [
    ('moons', lambda: sk_datasets.make_moons(10_000, noise=0.05,
                                             random_state=0)[0]),
    ('circles', lambda: sk_datasets.make_circles(10_000, noise=0.05,
                                                 factor=0.5,
                                                 random_state=0)[0]),
    ('swiss_roll', lambda: sk_datasets.make_swiss_roll(
        10_000, noise=0.5, random_state=0)[0][:, [0, 2]]),
])
def test_toy_points_are_a_scaled_copy_of_sklearn_in_unit_box(name, make):
    points = np.concatenate([data.load_split_array(name, 'train'),
                             data.load_split_array(name, 'test')])
    raw = make()
    assert points.shape == (10_000, 2) and points.dtype == np.float32
    assert np.abs(points).max() == pytest.approx(1.0)
    # One affine map with the same scale on both axes: distances shrink by a
    # single factor.
    ours = np.linalg.norm(points[1:] - points[:-1], axis=1)
    theirs = np.linalg.norm(raw[1:] - raw[:-1], axis=1)
    ratio = ours / theirs
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
    batch = next(data.get_dataset(name, 'train', batch_size=32, seed=0))
    assert batch['image'].shape == (32, 2)
    np.testing.assert_array_equal(batch['label'], 0)


# ------------------------------------------------------------- validation


@pytest.mark.parametrize('kwargs,field', [
    (dict(name='imagenet'), 'dataset name'),
    (dict(name='cifar10', split='validation'), 'split'),
    (dict(name='cifar10', image_size=64), 'image_size'),
    (dict(name='celeb_a', image_size=0), 'image_size'),
    (dict(name='moons', image_size=8), 'image_size'),
    (dict(name='digits', batch_size=0), 'batch_size'),
    (dict(name='digits', shard_index=2, shard_count=2), 'shard_index'),
    (dict(name='digits', shard_count=0), 'shard_count'),
    (dict(name='digits', num_epochs=0), 'num_epochs'),
    (dict(name='digits', start_step=-1), 'start_step'),
    (dict(name='digits', seed=-3), 'seed'),
    (dict(name='digits', worker_count=1.5), 'worker_count'),
])
def test_validate_data_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        data.validate_data_config(**kwargs)


def test_valid_configs_pass_and_get_dataset_validates_first():
    data.validate_data_config('celeb_a', 64, split='test', batch_size=8)
    data.validate_data_config('lsun/church_outdoor', 128, split='validation')
    data.validate_data_config('mnist', 28, shard_index=1, shard_count=2)
    with pytest.raises(ValueError, match='batch_size'):
        data.get_dataset('digits', 'train', batch_size=-1, seed=0)


def test_fewer_examples_than_one_global_batch_is_an_error():
    # digits/test has 297 examples: 2 processes x 150 rows do not fit one epoch.
    with pytest.raises(ValueError, match=r'batch_size x shard_count must be <= the 297 examples'):
        data.get_dataset('digits', 'test', batch_size=150, seed=0, shard_count=2, num_epochs=1)
    batches = _take(data.get_dataset('digits', 'test', batch_size=148, seed=0, shard_index=1, shard_count=2,
                                     num_epochs=1))
    assert len(batches) == 1 and batches[0]['image'].shape == (148, 8, 8, 1)
