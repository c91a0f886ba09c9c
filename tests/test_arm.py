"""The ARM blocks against hand-computed values, a second implementation, and their properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from arm_jax.errors import UserError
from arm_jax.models import ARMResNet18, SharingAffinity, head_geometry, pixel_shuffle
from arm_jax.models.arm import per_channel_conv


def test_pixel_shuffle_hand_computed():
    # 8 channels, r = 2 -> 2 channels: out[i, j, c] = in[c*4 + i*2 + j].
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    out = pixel_shuffle(x, 2)
    assert out.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(out[0, :, :, 0], [[0, 1], [2, 3]])
    np.testing.assert_array_equal(out[0, :, :, 1], [[4, 5], [6, 7]])


def test_pixel_shuffle_matches_torch_on_the_arm_shape():
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


def test_running_gar_averages_then_decays():
    module = SharingAffinity("running", momentum=0.1)
    variables = module.init(jax.random.key(0), jnp.zeros((2, 3)), train=False)
    batches = [jnp.full((2, 3), float(v)) for v in range(1, 13)]
    for batch in batches:
        _, updates = module.apply(variables, batch, train=True, mutable=["gar"])
        variables = {**variables, **updates}
    # Steps 1..10 average exactly (mean of 1..10 = 5.5); then two steps of momentum 0.1.
    expected = 5.5
    for value in (11.0, 12.0):
        expected = 0.9 * expected + 0.1 * value
    np.testing.assert_allclose(variables["gar"]["mean"], expected, rtol=1e-6)
    assert int(variables["gar"]["count"]) == 12


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


@pytest.mark.parametrize(
    "switches, fc_inputs",
    [
        (dict(arrangement=True, de_albino=True, affinity=True), 121),
        (dict(arrangement=True, de_albino=False, affinity=True), 121),
        (dict(arrangement=False, de_albino=True, affinity=False), 25),  # raw 7x7, k=3, stride 1
        (dict(arrangement=False, de_albino=False, affinity=True), 512),  # global average pooling
        (dict(arrangement=False, de_albino=False, affinity=False), 512),
    ],
)
def test_ablation_rows_shapes(switches, fc_inputs):
    model = ARMResNet18(num_classes=7, **switches)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3)), train=False))
    assert shapes["params"]["fc"]["kernel"].shape == (fc_inputs, 7)
    assert ("de_albino" in shapes["params"].get("arm", {})) == switches["de_albino"]
    assert ("affinity" in shapes["params"].get("arm", {})) == switches["affinity"]


def test_geometry_follows_input_size_and_rejects_impossible_sizes():
    assert head_geometry(ARMResNet18(num_classes=7, image_size=112))["representation_side"] == 5
    assert head_geometry(ARMResNet18(num_classes=7, image_size=200))["backbone_side"] == 7  # ceil(200/32)
    with pytest.raises(UserError, match="smaller than its 32x32 kernel"):
        ARMResNet18(num_classes=7, image_size=32)
    with pytest.raises(UserError, match="gar_mode"):
        ARMResNet18(num_classes=7, gar_mode="mean")


def test_wrong_input_shape_is_a_clear_error():
    model = ARMResNet18(num_classes=7, image_size=64)
    with pytest.raises(UserError, match="expects input"):
        model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False)


def test_bfloat16_computation_keeps_float32_parameters():
    model = ARMResNet18(num_classes=7, image_size=64, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = model.init({"params": jax.random.key(0)}, x, train=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    full = ARMResNet18(num_classes=7, image_size=64).apply(variables, x, train=False)
    half = model.apply(variables, x, train=False)
    assert half.dtype == jnp.float32
    assert np.abs(np.asarray(half) - np.asarray(full)).max() < 0.1 * np.abs(np.asarray(full)).max() + 0.05


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_matmul_path_equals_xla_conv(stride):
    """The im2col path used for XLA:CPU's slow 2x2-map case computes the same convolution."""
    from arm_jax.models.resnet import _conv_as_matmul

    x = jax.random.normal(jax.random.key(0), (3, 2 * stride, 2 * stride, 128))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 128, 16))
    pads = ((1, 1), (1, 1))
    reference = jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(_conv_as_matmul(x, kernel, stride, pads), reference, atol=1e-4, rtol=1e-5)
