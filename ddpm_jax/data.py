"""Input pipelines: TFDS random-access sources read by grain, no TensorFlow.

Every dataset goes through one code path (`get_dataset`):

  source (len + [i] -> {'image', 'label'})   tfds.data_source (array_record)
                                             or an in-memory ArraySource
  -> shuffle (reshuffled every epoch)        grain.MapDataset.shuffle + repeat
  -> preprocess (crop/resize, flip, scale)   grain.MapDataset.random_map
  -> blocks of the per-process batch         grain.MapDataset.batch (drop remainder)
  -> this process's blocks                   slicing: [shard_index::shard_count]
  -> skip `start_step` batches               slicing the MapDataset: O(1)
  -> threads (+ optional worker processes)   to_iter_dataset / mp_prefetch

Because every stage is a random-access `MapDataset`, batch k is a pure
function of (seed, shard_index, shard_count, batch_size, num_epochs, k):
resuming training at step k only needs `start_step=k`. The shuffle and the
flips run on the one global stream of examples, and process p takes rows
[p·b, (p+1)·b) of every global batch of shard_count·b rows (reading only
those), so the global batch k is the same for any number of processes: 2
processes with b = 32 see the batches of 1 process with b = 64.

Images leave as float32 [B, H, W, C] in [-1, 1] (x/127.5 - 1 for uint8 x, as
Ho et al. 2020, section 3.3, scale the data); labels as int32 [B] (0 for
unlabeled datasets). Random horizontal flips follow Ho et al., appendix B
(CIFAR10, CelebA-HQ, LSUN), and are off for digit datasets.

The offline default, 'digits', is scikit-learn's 8x8 digits (shipped inside
the pip package). The 2-D toy sets ('moons', 'circles', 'swiss_roll') give
float32 vectors [B, 2] under the same 'image' key, so training code is shared.

worker_count > 0 starts grain worker processes: the program must parse absl
flags first (`flags.FLAGS.mark_as_parsed()` outside absl.app) and run under an
`if __name__ == '__main__':` guard; its batches are grain SharedMemoryArrays
(ndarray subclass), to drop before exit. The default, 0, reads in threads.
"""

import dataclasses
import functools

import grain
import numpy as np
from PIL import Image

# Batches read ahead by threads; each thread builds whole batches.
_READ_OPTIONS = dict(num_threads=8, prefetch_buffer_size=8)
# Digits: sklearn's order, the last 297 of 1797 images are the test split.
_DIGITS_NUM_TEST = 297
# Toy 2-D sets: 10000 points drawn once with random_state=0, the last 2000
# are the test split.
_TOY_NUM_POINTS, _TOY_NUM_TEST = 10_000, 2_000


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs to know about one dataset.

    image_shape: default output shape of one example, [H, W, C] (or [D]).
    num_classes: number of labels (0: unlabeled, labels are all 0).
    random_flip: default for random horizontal flips at training time.
    tfds_name: name for tfds.data_source; None for in-memory sources.
    splits: allowed split names.
    resize: True when image_size may differ from image_shape (center crop +
      resize); False when image_size must be None or the native size.
    """
    image_shape: tuple[int, ...]
    num_classes: int
    random_flip: bool
    tfds_name: str | None
    splits: tuple[str, ...]
    resize: bool = False


_TRAIN_TEST = ('train', 'test')
_LSUN_SPLITS = ('train', 'validation')
DATASETS = {
    'digits': DatasetInfo((8, 8, 1), 10, False, None, _TRAIN_TEST),
    'moons': DatasetInfo((2,), 0, False, None, _TRAIN_TEST),
    'circles': DatasetInfo((2,), 0, False, None, _TRAIN_TEST),
    'swiss_roll': DatasetInfo((2,), 0, False, None, _TRAIN_TEST),
    'mnist': DatasetInfo((28, 28, 1), 10, False, 'mnist', _TRAIN_TEST),
    'fashion_mnist': DatasetInfo(
        (28, 28, 1), 10, False, 'fashion_mnist', _TRAIN_TEST),
    'cifar10': DatasetInfo((32, 32, 3), 10, True, 'cifar10', _TRAIN_TEST),
    'celeb_a': DatasetInfo((64, 64, 3), 0, True, 'celeb_a',
                           ('train', 'validation', 'test'), resize=True),
    'celeb_a_hq': DatasetInfo((256, 256, 3), 0, True, 'celeb_a_hq/256',
                              ('train',), resize=True),
    'lsun/bedroom': DatasetInfo((256, 256, 3), 0, True, 'lsun/bedroom',
                                _LSUN_SPLITS, resize=True),
    'lsun/church_outdoor': DatasetInfo(
        (256, 256, 3), 0, True, 'lsun/church_outdoor', _LSUN_SPLITS,
        resize=True),
    'lsun/cat': DatasetInfo((256, 256, 3), 0, True, 'lsun/cat', ('train',),
                            resize=True),
}


def _check_int(field, value, minimum, maximum=None):
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        allowed = f'an int >= {minimum}' + (
            f' and <= {maximum}' if maximum is not None else '')
        raise ValueError(f'{field} must be {allowed}, got {value!r}')


def validate_data_config(name, image_size=None, *, split=None,
                         batch_size=None, seed=0, shard_index=0,
                         shard_count=1, num_epochs=None, start_step=0,
                         worker_count=0, max_examples=None) -> None:
    """Raises one ValueError naming the first invalid field and what is allowed."""
    if name not in DATASETS:
        raise ValueError(f'dataset name must be one of {sorted(DATASETS)}, '
                         f'got {name!r}')
    info = DATASETS[name]
    if split is not None and split not in info.splits:
        raise ValueError(f'split for {name} must be one of {list(info.splits)}, '
                         f'got {split!r}')
    if image_size is not None:
        if len(info.image_shape) != 3:
            raise ValueError(f'image_size must be None for the vector dataset '
                             f'{name}, got {image_size!r}')
        _check_int('image_size', image_size, 1)
        native = info.image_shape[0]
        if not info.resize and image_size != native:
            raise ValueError(f'image_size for {name} must be None or {native} '
                             f'(its native size), got {image_size!r}')
    if batch_size is not None:
        _check_int('batch_size', batch_size, 1)
    _check_int('seed', seed, 0)
    _check_int('shard_count', shard_count, 1)
    _check_int('shard_index', shard_index, 0, shard_count - 1)
    if num_epochs is not None:
        _check_int('num_epochs', num_epochs, 1)
    _check_int('start_step', start_step, 0)
    _check_int('worker_count', worker_count, 0)
    if max_examples is not None:
        _check_int('max_examples', max_examples, 1)


def image_shape(name, image_size=None) -> tuple[int, ...]:
    """Shape of one output example: [H, W, C] for images, [D] for vectors."""
    shape = DATASETS[name].image_shape
    if image_size is None or len(shape) != 3:
        return shape
    return (image_size, image_size, shape[2])


# ------------------------------------------------------------------ sources


class ArraySource:
    """In-memory random-access source with the interface of tfds.data_source.

    images: [N, ...] (uint8 [N, H, W, C] or float32 [N, D]); labels: [N].
    """

    def __init__(self, images, labels):
        if len(images) != len(labels):
            raise ValueError(f'images and labels must have the same length, got '
                             f'{len(images)} and {len(labels)}')
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {'image': self.images[index], 'label': self.labels[index]}


def digits_uint8(values):
    """Maps sklearn digits values 0..16 to uint8 0..255: round(v * 255 / 16)."""
    return np.round(np.asarray(values, np.float64) * 255 / 16).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _digits_source(split):
    """sklearn 8x8 digits as uint8 [N, 8, 8, 1]; the last 297 are 'test'."""
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = digits_uint8(digits.images)[..., None]
    labels = digits.target.astype(np.int32)
    part = (slice(None, -_DIGITS_NUM_TEST) if split == 'train'
            else slice(-_DIGITS_NUM_TEST, None))
    return ArraySource(images[part], labels[part])


def toy_points(name):
    """10000 fixed 2-D points of a scikit-learn toy set, float32 in [-1, 1].

    Drawn once with random_state=0 and mapped by one affine map per set
    (midrange to 0, largest half-range to 1, same factor on both axes so the
    shape is kept). swiss_roll keeps the (x, z) plane of the 3-D roll.
    """
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    if name == 'moons':
        points, _ = datasets.make_moons(_TOY_NUM_POINTS, noise=0.05,
                                        random_state=0)
    elif name == 'circles':
        points, _ = datasets.make_circles(_TOY_NUM_POINTS, noise=0.05,
                                          factor=0.5, random_state=0)
    else:
        points, _ = datasets.make_swiss_roll(_TOY_NUM_POINTS, noise=0.5,
                                             random_state=0)
        points = points[:, [0, 2]]
    low, high = points.min(axis=0), points.max(axis=0)
    points = (points - (low + high) / 2) / ((high - low).max() / 2)
    return points.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _toy_source(name, split):
    points = toy_points(name)
    part = (slice(None, -_TOY_NUM_TEST) if split == 'train'
            else slice(-_TOY_NUM_TEST, None))
    return ArraySource(points[part], np.zeros(len(points), np.int32)[part])


def _not_prepared_message(name, tfds_name, data_dir):
    where = (f'data_dir={data_dir}' if data_dir else
             'the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)')
    # Double quotes inside: the command is wrapped in single quotes.
    dir_arg = f', data_dir="{data_dir}"' if data_dir else ''
    manual = (' celeb_a_hq and lsun need the raw files placed in the manual '
              'download dir first (see the TFDS catalog page).'
              if name.startswith(('celeb_a_hq', 'lsun')) else '')
    return (
        f'{name} is not prepared in array_record format in {where}; run: '
        f"python -c 'import tensorflow_datasets as tfds; "
        f'tfds.builder("{tfds_name}"{dir_arg}).download_and_prepare('
        f'file_format="array_record")\' (needs `pip install '
        f'ddpm_jax[tensorflow]`). A copy prepared in the default TFRecord '
        f'format cannot be read by tfds.data_source: prepare it again with '
        f"file_format='array_record' or use another data_dir.{manual}")


def open_source(name, split, data_dir=None):
    """Random-access source (len, [i] -> dict) of one split, without TensorFlow.

    Raises FileNotFoundError with the command to run when a TFDS dataset is not
    prepared (in array_record format) under data_dir.
    """
    info = DATASETS[name]
    if name == 'digits':
        return _digits_source(split)
    if info.tfds_name is None:
        return _toy_source(name, split)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
        return tfds.data_source(info.tfds_name, split=split, data_dir=data_dir,
                                download=False)
    except (NotImplementedError, FileNotFoundError, AssertionError) as e:
        # TFDS reports a missing dataset as an unsupported (TFRecord) format.
        raise FileNotFoundError(
            _not_prepared_message(name, info.tfds_name, data_dir)) from e


# ------------------------------------------------------------ preprocessing


def center_crop_resize(image, image_size):
    """uint8 [H, W, C] -> uint8 [S, S, C]: central square crop, then resize.

    The crop keeps the central min(H, W) square (offsets rounded down). The
    resize is PIL bicubic, which widens its kernel by the downsampling factor,
    so downsampling is antialiased (no aliasing of LSUN's 256+ px textures).
    """
    height, width, channels = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top:top + side, left:left + side]
    if side == image_size:
        return crop
    pil = Image.fromarray(crop[..., 0] if channels == 1 else crop)
    resized = pil.resize((image_size, image_size), resample=Image.BICUBIC)
    return np.asarray(resized).reshape(image_size, image_size, channels)


def to_float(image):
    """uint8 {0..255} -> float32 in [-1, 1]: x / 127.5 - 1 (Ho et al. 3.3)."""
    return np.asarray(image, np.float32) / 127.5 - 1.0


def _preprocess_image(example, rng, *, image_size, random_flip):
    """One TFDS/digits example -> {'image': float32 [H, W, C], 'label': int32}."""
    image = np.asarray(example['image'])
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        image = center_crop_resize(image, image_size)
    # The draw happens even without flips so that enabling them does not
    # change any other random choice.
    flip = rng.random() < 0.5
    if random_flip and flip:
        image = image[:, ::-1]
    return {'image': to_float(image),
            'label': np.int32(example.get('label', 0))}


def _preprocess_vector(example, rng):
    """Toy 2-D points are stored already in [-1, 1]; nothing to do."""
    del rng
    return {'image': np.asarray(example['image'], np.float32),
            'label': np.int32(example['label'])}


def _preprocess_fn(name, image_size, random_flip):
    if len(DATASETS[name].image_shape) != 3:
        return _preprocess_vector
    return functools.partial(_preprocess_image, image_size=image_size,
                             random_flip=random_flip)


def _default_image_size(name, image_size):
    info = DATASETS[name]
    if image_size is None and info.resize:
        return info.image_shape[0]
    return image_size


# ----------------------------------------------------------------- pipelines


def get_dataset(name, split, *, batch_size, seed, shard_index=0,
                shard_count=1, image_size=None, random_flip=None,
                data_dir=None, num_epochs=None, start_step=0,
                worker_count=0):
    """Iterator over one process's rows of the global batches of a split.

    Yields dict(image=float32 [B, H, W, C] in [-1, 1] (or [B, D] for vector
    sets), label=int32 [B]) with B = batch_size, the PER-PROCESS batch. Pass
    shard_index=jax.process_index(), shard_count=jax.process_count(): batch k
    of process p holds rows [p·B, (p+1)·B) of the global batch k (B·shard_count
    rows), which does not depend on shard_count. The split is reshuffled every
    epoch; batches may straddle epochs; with num_epochs set, the last partial
    global batch is dropped, so every process runs the same number of steps.

    Batch k depends only on (seed, shard_index, shard_count, batch_size,
    num_epochs, image_size, random_flip, k): start_step=k yields exactly the
    batches k, k+1, ... of the uninterrupted iterator. The returned grain
    iterator also has get_state()/set_state() (its position after start_step).
    num_epochs=None repeats forever. random_flip=None uses the dataset default.
    """
    validate_data_config(name, image_size, split=split, batch_size=batch_size,
                         seed=seed, shard_index=shard_index,
                         shard_count=shard_count, num_epochs=num_epochs,
                         start_step=start_step, worker_count=worker_count)
    info = DATASETS[name]
    random_flip = info.random_flip if random_flip is None else random_flip
    image_size = _default_image_size(name, image_size)
    # Separate streams so the flips do not correlate with the order.
    shuffle_seed, map_seed = (
        int(s) for s in np.random.SeedSequence(seed).generate_state(2))

    source = open_source(name, split, data_dir)
    if num_epochs is not None and len(source) * num_epochs < batch_size * shard_count:
        raise ValueError(
            f'batch_size x shard_count must be <= the {len(source)} examples of '
            f'{name}/{split} x num_epochs={num_epochs} (one whole global batch), '
            f'got {batch_size} x {shard_count}')
    ds = grain.MapDataset.source(source)
    ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.random_map(_preprocess_fn(name, image_size, random_flip),
                       seed=map_seed)
    # repeat() reseeds the shuffle and the flips of every epoch.
    ds = ds.repeat(num_epochs)
    # Blocks of B examples; global batch k is blocks k·count ... k·count + count - 1.
    ds = ds.batch(batch_size, drop_remainder=True)
    if num_epochs is not None:  # whole global batches only
        ds = ds[:len(ds) // shard_count * shard_count]
    ds = ds[shard_index::shard_count][start_step:]
    ids = ds.to_iter_dataset(grain.ReadOptions(**_READ_OPTIONS))
    if worker_count > 0:
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(ids)


def load_split_array(name, split, *, image_size=None, data_dir=None,
                     max_examples=None) -> np.ndarray:
    """The first max_examples of a split, in order, without flips.

    Returns float32 [N, H, W, C] in [-1, 1] ([N, D] for vector sets), for
    evaluation (NLL over a test split, FID reference statistics).
    """
    validate_data_config(name, image_size, split=split,
                         max_examples=max_examples)
    image_size = _default_image_size(name, image_size)
    source = open_source(name, split, data_dir)
    count = min(max_examples or len(source), len(source))
    preprocess = _preprocess_fn(name, image_size, random_flip=False)
    # Without flips the preprocessing output does not depend on the rng.
    rng = np.random.default_rng(0)
    return np.stack([preprocess(source[i], rng)['image'] for i in range(count)])
