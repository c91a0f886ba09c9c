"""The ARM blocks against hand-computed values, a second implementation, and their properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arm_jax.interop.pretrained import init_variables
from arm_jax.models import ARMResNet18, SharingAffinity, head_geometry, pixel_shuffle
from arm_jax.models.arm import ARM, per_channel_conv
from tests.small_models import normal


def test_pixel_shuffle_hand_computed():
    # 8 channels, r = 2 -> 2 channels: out[i, j, c] = in[c*4 + i*2 + j].
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    out = pixel_shuffle(x, 2)
    assert out.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(out[0, :, :, 0], [[0, 1], [2, 3]])
    np.testing.assert_array_equal(out[0, :, :, 1], [[4, 5], [6, 7]])


def test_pixel_shuffle_matches_torch_on_the_arm_shape():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 512, 3, 3)).astype(np.float32)
    expected = torch.nn.PixelShuffle(16)(torch.from_numpy(x)).numpy()  # (2, 2, 48, 48)
    got = pixel_shuffle(jnp.asarray(x.transpose(0, 2, 3, 1)), 16)
    np.testing.assert_array_equal(np.asarray(got).transpose(0, 3, 1, 2), expected)


def test_de_albino_hand_computed():
    # A 2x2 kernel [[1, 2], [3, 4]], stride 1, no padding, on a 3x3 map: 2x2 outputs.
    plane = np.arange(9.0).reshape(3, 3)  # [[0,1,2],[3,4,5],[6,7,8]]
    x = jnp.asarray(np.stack([plane, 10 * plane], axis=-1)[None])  # two channels
    kernel = jnp.asarray([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    out = per_channel_conv(x, kernel, stride=1)
    first = [[0 + 2 + 9 + 16, 1 + 4 + 12 + 20], [3 + 8 + 18 + 28, 4 + 10 + 21 + 32]]
    np.testing.assert_array_equal(out[0, :, :, 0], first)
    np.testing.assert_array_equal(out[0, :, :, 1], 10 * np.asarray(first))  # the same kernel for both


def test_de_albino_perception_bias_of_figure_4():
    """Paper Fig. 4: a 3x3 kernel, stride 1, no padding, on 7x7: corners seen once, the centre 9 times."""
    kernel = jnp.ones((3, 3, 1, 1))
    frequency = jax.grad(lambda x: per_channel_conv(x, kernel, 1).sum())(jnp.zeros((1, 7, 7, 1)))[0, :, :, 0]
    assert frequency[0, 0] == 1 and frequency[0, 3] == 3 and frequency[1, 1] == 4 and frequency[3, 3] == 9


def test_de_albino_stride_and_no_padding():
    out = per_channel_conv(jnp.ones((1, 112, 112, 2)), jnp.ones((32, 32, 1, 1)), stride=8)
    assert out.shape == (1, 11, 11, 2)
    np.testing.assert_array_equal(out, 32 * 32)  # every window lies inside the map: no zeros padded in


def test_sharing_affinity_batch_mode():
    representation = jnp.asarray([[1.0, 2.0], [3.0, 6.0]])
    module = SharingAffinity("batch")
    variables = module.init(jax.random.key(0), representation, train=False)
    variables = {**variables, "params": {"alpha": jnp.asarray([0.5])}}
    out = module.apply(variables, representation, train=False)
    np.testing.assert_allclose(out, representation + 0.5 * jnp.asarray([2.0, 4.0]))
    alone = module.apply(variables, representation[:1], train=False)
    np.testing.assert_allclose(alone, 1.5 * representation[:1])  # x + alpha * x, as users report


def test_running_gar_averages_then_decays(rng):
    module = SharingAffinity("running", momentum=0.1)
    variables = module.init(jax.random.key(0), jnp.zeros((4, 3)), train=False)
    # Every example and feature differs, so a mean over the wrong axis cannot pass.
    batches = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(12)]
    for batch in batches:
        _, updates = module.apply(variables, jnp.asarray(batch), train=True, mutable=["gar"])
        variables = {**variables, **updates}
    # Steps 1..10 average the batch GARs exactly; then two steps of momentum 0.1.
    gars = [batch.astype(np.float64).mean(axis=0) for batch in batches]
    expected = np.mean(gars[:10], axis=0)
    for gar in gars[10:]:
        expected = 0.9 * expected + 0.1 * gar
    np.testing.assert_allclose(variables["gar"]["mean"], expected, rtol=1e-5, atol=1e-6)
    assert int(variables["gar"]["count"]) == 12


@pytest.mark.slow  # fast tier: the model applied at several batch shapes and modes (27 s under load)
def test_running_mode_prediction_does_not_depend_on_the_batch():
    model = ARMResNet18(num_classes=3, image_size=64, gar_mode="running")
    x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    variables = model.init({"params": jax.random.key(0)}, x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats", "gar"])
    variables = {**variables, **updates}
    together = model.apply(variables, x, train=False)
    alone = jnp.concatenate([model.apply(variables, x[i : i + 1], train=False) for i in range(4)])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    batch_model = ARMResNet18(num_classes=3, image_size=64, gar_mode="batch")
    assert np.abs(batch_model.apply(variables, x[:1], train=False) - together[:1]).max() > 1e-4


ROWS = {  # Table 2's rows: (arrangement, de_albino, affinity)
    "none": (False, False, False), "DA": (False, True, False), "SA": (False, False, True),
    "FA+DA": (True, True, False), "FA+SA": (True, False, True), "DA+SA": (False, True, True),
    "FA+DA+SA": (True, True, True),
}


def _windows(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """Second implementation: every channel of NHWC `x` through one k x k kernel, no padding."""
    k = kernel.shape[0]
    patches = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("nhwcij,ij->nhwc", patches, kernel)


def _numpy_head(features: np.ndarray, params: dict, switches, raw_kernel: int) -> np.ndarray:
    """The README table's rows in numpy, training mode (BatchNorm with batch statistics, batch GAR)."""
    arrangement, de_albino, affinity = switches
    x = features.astype(np.float64)
    if arrangement:  # out[n, 16h + i, 16w + j, c] = in[n, h, w, 256c + 16i + j]
        n, h, w, _ = x.shape
        x = x.reshape(n, h, w, 2, 16, 16).transpose(0, 1, 4, 2, 5, 3).reshape(n, 16 * h, 16 * w, 2)
    kernel, stride = (32, 8) if arrangement else (raw_kernel, 1)
    if de_albino:
        x = _windows(x, np.asarray(params["de_albino"]["kernel"], np.float64)[:, :, 0, 0], stride)
    elif arrangement:
        x = _windows(x, np.full((kernel, kernel), 1.0 / kernel**2), stride)  # the fixed average
    if de_albino or arrangement:  # BatchNorm over the channels (512 raw, 2 arranged), then their mean
        x = (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + 1e-5)
        representation = x.mean(axis=-1).reshape(len(x), -1)
    else:
        representation = x.mean(axis=(1, 2))
    if affinity:
        representation = representation + float(params["affinity"]["alpha"][0]) * representation.mean(axis=0)
    return representation


@pytest.mark.parametrize("row", list(ROWS))
def test_ablation_rows_compute_what_the_readme_table_says(row, rng):
    switches = ROWS[row]
    arrangement, de_albino, affinity = switches
    head = ARM(arrangement=arrangement, de_albino=de_albino, affinity=affinity)
    features = rng.normal(size=(3, 7, 7, 512)).astype(np.float32)  # the backbone map at 224 px
    variables = head.init(jax.random.key(0), features, train=False)
    params = jax.tree.map(np.asarray, variables.get("params", {}))  # the plain row has none
    if affinity:  # alpha away from its initial 1.0, so a wrong use of it shows
        params["affinity"]["alpha"] = np.asarray([0.7], np.float32)
    out, _ = head.apply({**variables, "params": params}, features, train=True, mutable=["batch_stats", "gar"])
    expected = _numpy_head(features, params, switches, raw_kernel=3)
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)

    model = ARMResNet18(num_classes=7, arrangement=arrangement, de_albino=de_albino, affinity=affinity)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3)), train=False))
    assert shapes["params"]["fc"]["kernel"].shape == (expected.shape[1], 7)
    assert ("de_albino" in shapes["params"].get("arm", {})) == de_albino
    assert ("affinity" in shapes["params"].get("arm", {})) == affinity


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_raw_kernel_sweep_of_figure_6(k, rng):
    """De-albino on the raw 7x7 map (no arrangement): a k x k kernel, (8-k)^2 fc inputs at 224."""
    model = ARMResNet18(num_classes=7, arrangement=False, de_albino=True, affinity=True, raw_kernel=k)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3)), train=False))
    assert shapes["params"]["fc"]["kernel"].shape == ((8 - k) ** 2, 7)
    assert shapes["params"]["arm"]["de_albino"]["kernel"].shape == (k, k, 1, 1)
    head = ARM(arrangement=False, de_albino=True, affinity=True, raw_kernel=k)
    features = rng.normal(size=(2, 7, 7, 512)).astype(np.float32)
    variables = head.init(jax.random.key(0), features, train=False)
    out, _ = head.apply(variables, features, train=True, mutable=["batch_stats", "gar"])
    expected = _numpy_head(features, jax.tree.map(np.asarray, variables["params"]), (False, True, True), k)
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.slow  # fast tier: initialises the full model (17 s of CPU)
def test_head_starts_from_pytorchs_default_initialisation():
    """fc and De-albino U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as nn.Linear/nn.Conv2d; BN 1/0; alpha 1."""
    variables = init_variables(ARMResNet18(num_classes=7, image_size=96), jax.random.key(0))  # as test_steps: one compile
    head = variables["params"]
    for values, fan_in in ((head["fc"]["kernel"], 9), (head["fc"]["bias"], 9),
                           (head["arm"]["de_albino"]["kernel"], 32 * 32)):
        values, bound = np.asarray(values), fan_in**-0.5
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() >= (0.7 if values.size < 10 else 0.9) * bound  # uniform up to the bound
        if values.size > 100:
            assert np.std(values) == pytest.approx(bound / np.sqrt(3), rel=0.1)  # the uniform's spread
    np.testing.assert_array_equal(head["arm"]["affinity"]["alpha"], [1.0])
    np.testing.assert_array_equal(head["arm"]["bn"]["scale"], [1.0, 1.0])
    np.testing.assert_array_equal(head["arm"]["bn"]["bias"], [0.0, 0.0])
    stats = variables["batch_stats"]["arm"]["bn"]
    np.testing.assert_array_equal(stats["mean"], [0.0, 0.0])
    np.testing.assert_array_equal(stats["var"], [1.0, 1.0])


@pytest.mark.parametrize("size, side", [(33, 1), (64, 1), (65, 3), (96, 3), (112, 5), (224, 11)])
def test_representation_side_follows_the_readme(size, side):
    """The README: ((16 * ceil(size / 32) - 32) // 8 + 1)^2 features; 33-64 px give a 1x1 map."""
    assert head_geometry(ARMResNet18(num_classes=7, image_size=size))["representation_side"] == side


def test_geometry_follows_input_size_and_rejects_impossible_sizes():
    assert head_geometry(ARMResNet18(num_classes=7, image_size=112))["representation_side"] == 5
    assert head_geometry(ARMResNet18(num_classes=7, image_size=200))["backbone_side"] == 7  # ceil(200/32)
    for too_small in (1, 31, 32):  # the README: 32 px or less is an error
        with pytest.raises(ValueError, match="smaller than its 32x32 kernel"):
            ARMResNet18(num_classes=7, image_size=too_small)
    with pytest.raises(ValueError, match="gar_mode"):
        ARMResNet18(num_classes=7, gar_mode="mean")


def test_wrong_input_shape_is_a_clear_error():
    model = ARMResNet18(num_classes=7, image_size=64)
    with pytest.raises(ValueError, match="expects input"):
        model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False)


@pytest.mark.slow  # fast tier: the full model in float32 and bf16 (32 s of CPU)
def test_bfloat16_computation_keeps_float32_parameters():
    model = ARMResNet18(num_classes=7, image_size=64, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = model.init({"params": jax.random.key(0)}, x, train=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    full = ARMResNet18(num_classes=7, image_size=64).apply(variables, x, train=False)
    half = model.apply(variables, x, train=False)
    assert half.dtype == jnp.float32
    difference = np.abs(np.asarray(half) - np.asarray(full)).max()
    assert difference < 0.1 * np.abs(np.asarray(full)).max() + 0.05
    assert difference > 1e-4  # bf16 rounding shows: the model did compute in bf16 (float32 gives 0)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_matmul_path_equals_xla_conv(stride):
    """The im2col path used for XLA:CPU's slow 2x2-map case computes the same convolution."""
    from arm_jax.models.conv import patches_matmul_conv

    x = normal(0, (3, 2 * stride, 2 * stride, 128))
    kernel = normal(1, (3, 3, 128, 16))
    pads = ((1, 1), (1, 1))
    reference = jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(patches_matmul_conv(x, kernel, stride, 1), reference, atol=1e-4, rtol=1e-5)


def test_a_head_too_large_for_the_image_is_a_message_naming_the_option(tmp_path):
    """The model raises ValueError; `arm-jax train` turns it into a one-line message naming --image-size."""
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, ["train", "--workdir", str(tmp_path / "w"), "--image-size", "24",
                                      "--max-train-examples", "32", "--batch-size", "16", "--parallel", "none"])
    assert result.exit_code == 2, result.output
    assert "--image-size 24" in result.output and "smaller than its 32x32 kernel" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "w" / "checkpoints").exists()
