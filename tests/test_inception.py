"""Tests for ddpm_jax/evaluation/inception.py, the FID Inception-v3, without its weights.

The expected state_dict is written out here from the torchvision Inception3
constructor (the BasicConv2d channel and kernel arguments) with pytorch-fid's
changes (no aux head, 1008 classes); the table is itself checked against
torchvision's published parameter count. The weights are pseudo-random (the
real ones cannot be downloaded here), and outputs recorded from pytorch-fid
itself on those weights pin down the architecture.
"""

import os

import numpy as np
import pytest

from ddpm_jax.evaluation import inception

BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def _conv(name, cin, cout, kh, kw=None):
    kw = kh if kw is None else kw
    table = {f"{name}.conv.weight": (cout, cin, kh, kw)}
    table.update({f"{name}.bn.{field}": (cout,) for field in BN_FIELDS})
    return table


def _inception_a(p, cin, pool):
    return {**_conv(f"{p}.branch1x1", cin, 64, 1), **_conv(f"{p}.branch5x5_1", cin, 48, 1),
            **_conv(f"{p}.branch5x5_2", 48, 64, 5), **_conv(f"{p}.branch3x3dbl_1", cin, 64, 1),
            **_conv(f"{p}.branch3x3dbl_2", 64, 96, 3), **_conv(f"{p}.branch3x3dbl_3", 96, 96, 3),
            **_conv(f"{p}.branch_pool", cin, pool, 1)}


def _inception_c(p, c7):
    return {**_conv(f"{p}.branch1x1", 768, 192, 1), **_conv(f"{p}.branch7x7_1", 768, c7, 1),
            **_conv(f"{p}.branch7x7_2", c7, c7, 1, 7), **_conv(f"{p}.branch7x7_3", c7, 192, 7, 1),
            **_conv(f"{p}.branch7x7dbl_1", 768, c7, 1), **_conv(f"{p}.branch7x7dbl_2", c7, c7, 7, 1),
            **_conv(f"{p}.branch7x7dbl_3", c7, c7, 1, 7), **_conv(f"{p}.branch7x7dbl_4", c7, c7, 7, 1),
            **_conv(f"{p}.branch7x7dbl_5", c7, 192, 1, 7), **_conv(f"{p}.branch_pool", 768, 192, 1)}


def _inception_e(p, cin):
    return {**_conv(f"{p}.branch1x1", cin, 320, 1), **_conv(f"{p}.branch3x3_1", cin, 384, 1),
            **_conv(f"{p}.branch3x3_2a", 384, 384, 1, 3), **_conv(f"{p}.branch3x3_2b", 384, 384, 3, 1),
            **_conv(f"{p}.branch3x3dbl_1", cin, 448, 1), **_conv(f"{p}.branch3x3dbl_2", 448, 384, 3),
            **_conv(f"{p}.branch3x3dbl_3a", 384, 384, 1, 3),
            **_conv(f"{p}.branch3x3dbl_3b", 384, 384, 3, 1), **_conv(f"{p}.branch_pool", cin, 192, 1)}


def pytorch_fid_shapes(num_classes=1008, aux_logits=False):
    """{state_dict key: shape} of torchvision's Inception3 (pytorch-fid: 1008 classes, no aux)."""
    table = {**_conv("Conv2d_1a_3x3", 3, 32, 3), **_conv("Conv2d_2a_3x3", 32, 32, 3),
             **_conv("Conv2d_2b_3x3", 32, 64, 3), **_conv("Conv2d_3b_1x1", 64, 80, 1),
             **_conv("Conv2d_4a_3x3", 80, 192, 3),
             **_inception_a("Mixed_5b", 192, 32), **_inception_a("Mixed_5c", 256, 64),
             **_inception_a("Mixed_5d", 288, 64),
             **_conv("Mixed_6a.branch3x3", 288, 384, 3), **_conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1),
             **_conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3), **_conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3),
             **_inception_c("Mixed_6b", 128), **_inception_c("Mixed_6c", 160),
             **_inception_c("Mixed_6d", 160), **_inception_c("Mixed_6e", 192),
             **_conv("Mixed_7a.branch3x3_1", 768, 192, 1), **_conv("Mixed_7a.branch3x3_2", 192, 320, 3),
             **_conv("Mixed_7a.branch7x7x3_1", 768, 192, 1),
             **_conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
             **_conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
             **_conv("Mixed_7a.branch7x7x3_4", 192, 192, 3),
             **_inception_e("Mixed_7b", 1280), **_inception_e("Mixed_7c", 2048),
             "fc.weight": (num_classes, 2048), "fc.bias": (num_classes,)}
    if aux_logits:
        table.update({**_conv("AuxLogits.conv0", 768, 128, 1), **_conv("AuxLogits.conv1", 128, 768, 5),
                      "AuxLogits.fc.weight": (num_classes, 768), "AuxLogits.fc.bias": (num_classes,)})
    return table


def _uniform_hash(count, stream):
    """count values in [-1, 1) from the splitmix64 hash of (stream, index): exact integer
    arithmetic, so identical on every platform and NumPy version, unlike an RNG stream."""
    z = np.arange(count, dtype=np.uint64) + np.uint64(stream * 0x9E3779B97F4A7C15 % 2 ** 64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -52 - 1.0


def deterministic_state_dict():
    """Pseudo-random weights in PyTorch layout that keep activations O(1) through 94 convs."""
    state_dict = {}
    for index, (key, shape) in enumerate(pytorch_fid_shapes().items()):
        noise = _uniform_hash(int(np.prod(shape)), index).reshape(shape)  # variance 1/3
        if key.endswith("conv.weight"):
            value = noise * np.sqrt(6.0 / np.prod(shape[1:]))  # He: variance 2 / fan_in
        elif key.endswith(("running_var", "bn.weight")):
            value = 1.0 + 0.5 * noise
        elif key == "fc.weight":
            value = 0.05 * noise
        else:
            value = 0.1 * noise
        state_dict[key] = value.astype(np.float32)
    return state_dict


@pytest.fixture(scope="module")
def state_dict():
    return deterministic_state_dict()


@pytest.fixture(scope="module")
def variables(state_dict):
    return inception.state_dict_to_variables(state_dict)


def test_table_reproduces_torchvision_parameter_count():
    """torchvision documents inception_v3 (1000 classes, aux head) as 27,161,264 parameters."""
    table = pytorch_fid_shapes(num_classes=1000, aux_logits=True)
    trainable = [shape for key, shape in table.items() if "running" not in key]
    assert sum(int(np.prod(shape)) for shape in trainable) == 27_161_264
    assert len(pytorch_fid_shapes()) == 94 * 5 + 2


def test_variables_are_the_pytorch_fid_state_dict(state_dict, variables):
    """Every Flax variable maps to exactly one pytorch-fid key, with its layout transposed."""
    back = inception.variables_to_state_dict(variables)
    assert {k: v.shape for k, v in back.items()} == pytorch_fid_shapes()
    for key in state_dict:
        np.testing.assert_array_equal(back[key], state_dict[key])
    conv = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    np.testing.assert_array_equal(conv, state_dict["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    assert conv.shape == (1, 7, 128, 128)
    np.testing.assert_array_equal(variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                  state_dict["Mixed_7c.branch_pool.bn.running_var"])


def test_loader_round_trips_an_npz_by_path_and_by_env_var(state_dict, tmp_path, monkeypatch):
    path = tmp_path / "fid_inception.npz"
    # A converted file may still carry BatchNorm's step counters: they are ignored.
    np.savez(path, **state_dict, **{"Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0, np.int64)})
    by_path = inception.load_inception_variables(str(path))
    monkeypatch.setenv(inception.WEIGHTS_ENV_VAR, str(path))
    by_env = inception.load_inception_variables()
    for loaded in (by_path, by_env):
        back = inception.variables_to_state_dict(loaded)
        assert set(back) == set(state_dict)
        for key in state_dict:
            np.testing.assert_array_equal(back[key], state_dict[key])


def test_loader_rejects_weights_that_do_not_match(state_dict):
    missing = {k: v for k, v in state_dict.items() if k != "Mixed_5b.branch_pool.bn.bias"}
    with pytest.raises(ValueError, match="missing.*Mixed_5b.branch_pool.bn.bias"):
        inception.state_dict_to_variables(missing)
    with pytest.raises(ValueError, match="unexpected.*AuxLogits"):
        inception.state_dict_to_variables({**state_dict, "AuxLogits.fc.bias": np.zeros(1008)})
    with pytest.raises(ValueError, match=r"fc.weight.*\(1000, 2048\).*\(1008, 2048\)"):
        inception.state_dict_to_variables({**state_dict, "fc.weight": np.zeros((1000, 2048))})


def test_missing_weights_error_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)
    for path in (None, str(tmp_path / "absent.npz")):
        with pytest.raises(FileNotFoundError) as error:
            inception.load_inception_variables(path)
        message = str(error.value)
        assert inception.WEIGHTS_URL in message
        assert "scripts/convert_fid_inception.py" in message and "DDPM_JAX_FID_WEIGHTS" in message
    (tmp_path / "pt_inception.pth").write_bytes(b"not converted")
    with pytest.raises(ValueError, match="convert_fid_inception"):
        inception.load_inception_variables(str(tmp_path / "pt_inception.pth"))
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_fid_inception.py")
    assert os.path.isfile(script)


def _bilinear_matrix(size_in, size_out):
    """[out, in] weights of PyTorch's bilinear resize with align_corners=False (no antialias)."""
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        source = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
        low = min(int(np.floor(source)), size_in - 1)
        high, frac = min(low + 1, size_in - 1), source - np.floor(source)
        matrix[i, low] += 1.0 - frac
        matrix[i, high] += frac
    return matrix


@pytest.mark.parametrize("size", [8, 400])
def test_preprocess_matches_pytorch_bilinear_resize(size):
    images = np.random.default_rng(size).uniform(-1.0, 1.0, (2, size, size, 1)).astype(np.float32)
    resize = _bilinear_matrix(size, inception.INPUT_SIZE)
    expected = resize @ images[..., 0].astype(np.float64) @ resize.T  # rows, then columns
    got = np.asarray(inception.preprocess(images))
    assert got.shape == (2, 299, 299, 3)
    for channel in range(3):  # grayscale is repeated over RGB
        np.testing.assert_allclose(got[..., channel], expected, atol=1e-4)  # float32 sums of 400 terms


def test_inception_features_shapes_batching_and_unbiased_logits(state_dict, variables):
    images = np.random.default_rng(1).uniform(-1.0, 1.0, (3, 8, 8, 1)).astype(np.float32)
    pool, logits = inception.inception_features(variables, images, batch_size=2)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    assert np.all(np.isfinite(pool)) and np.all(pool >= 0.0)  # the mean of ReLU outputs
    assert np.std(pool[0] - pool[1]) > 1e-3  # different images give different features
    # Logits are pool_3 · fc.weightᵀ without fc.bias, as the original IS code.
    np.testing.assert_allclose(logits, pool.astype(np.float64) @ state_dict["fc.weight"].T.astype(np.float64),
                               rtol=1e-4, atol=1e-4)
    # Regrouping into batches (the last one zero-padded) changes nothing.
    pool_reversed, _ = inception.inception_features(variables, images[::-1], batch_size=2)
    np.testing.assert_allclose(pool_reversed[::-1], pool, rtol=1e-5, atol=1e-5)


def test_matches_outputs_recorded_from_pytorch_fid(variables):
    """pytorch-fid 0.3.0 (torch 2.13, torchvision 0.28) InceptionV3([3], resize_input=True,
    normalize_input=False) with deterministic_state_dict() loaded, on these two images.

    Shapes cannot catch a wrong branch order, padding or pooling variant; these
    numbers do (checked: counting the padding in the average pools, average-pooling
    in Mixed_7c, or swapping two branches of InceptionC each fails this test).
    """
    images = np.stack([np.sin(np.arange(192) * 0.37), np.cos(np.arange(192) * 1.3)])
    pool, logits = inception.inception_features(variables, images.reshape(2, 8, 8, 3).astype(np.float32))
    np.testing.assert_allclose(pool[:, :4], [[2.5359501839, 11.6978397369, 0.0976412147, 0.6571983695],
                                             [3.5954592228, 15.8441638947, 0.0659941435, 1.1634069681]],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pool.mean(axis=1), [2.71713024, 3.5811531889], rtol=1e-4)
    # Projections on fixed directions are sensitive to the order of all 2048 channels / 1008 classes.
    np.testing.assert_allclose(pool @ np.cos(np.arange(2048) * 0.91), [-26.6186427421, -52.3000511435],
                               rtol=1e-4)
    np.testing.assert_allclose(logits @ np.cos(np.arange(1008) * 0.53), [102.3365211915, 122.485100184],
                               rtol=1e-4)


def test_inception_features_reject_bad_images(variables):
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        inception.inception_features(variables, np.zeros((2, 8, 8, 2), np.float32))


def test_matches_pytorch_fid_when_torch_is_installed(state_dict, variables, monkeypatch):
    """pytorch-fid's own InceptionV3 on the same weights, other images (skipped without torch)."""
    torch = pytest.importorskip("torch")
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    weights = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: weights)
    model = pytorch_fid_inception.InceptionV3([3], resize_input=True, normalize_input=False).eval()
    images = np.random.default_rng(2).uniform(-1.0, 1.0, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
    pool, _ = inception.inception_features(variables, images)
    np.testing.assert_allclose(pool, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
