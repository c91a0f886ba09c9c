"""Parity of arm-jax with PyTorch models built with torchvision's names and the released ARM semantics."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from arm_jax.interop.convert import convert_for_model, flax_to_torch, key_table, torch_to_flax
from arm_jax.models import ARMResNet18, with_runtime

torch = pytest.importorskip("torch")
from arm_jax.interop.torch_reference import TorchARMResNet18, TorchResNet18, randomise_batchnorm

LOGIT_TOLERANCE = 1e-4
GRADIENT_RELATIVE_TOLERANCE = 1e-3
BATCH = 4


def torch_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def make_pair(image_size: int, seed: int = 0):
    """A randomly initialised authors'-layout torch model, its arm-jax twin and a batch of images."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    torch_model = TorchARMResNet18(num_classes=7, image_size=image_size)
    randomise_batchnorm(torch_model, generator)
    with torch.no_grad():  # alpha away from its initial 1.0, so a wrong use of it shows
        torch_model.arm.alpha.fill_(0.7)
    model = ARMResNet18(num_classes=7, image_size=image_size)
    variables = convert_for_model(torch_state_dict(torch_model), model)
    images = torch.randn(BATCH, 3, image_size, image_size, generator=generator)
    return torch_model, model, variables, images


def to_nhwc(images: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


# 224 px (the paper's size) runs in the full suite; the fast tier compares at 112 px, where the
# same code paths run (a 5x5 representation instead of 11x11: test_arm.py checks that geometry).
@pytest.fixture(scope="module", params=[pytest.param(224, marks=pytest.mark.slow), 112],
                ids=lambda size: f"size{size}")
def pair(request):
    return make_pair(request.param)


def test_eval_logits_match(pair):
    torch_model, model, variables, images = pair
    torch_model.eval()
    with torch.no_grad():
        expected = torch_model(images).numpy()
    got = np.asarray(model.apply(variables, to_nhwc(images), train=False))
    print(f"eval logits max abs difference: {np.abs(got - expected).max():.2e}")
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE


def test_train_logits_and_batchnorm_updates_match(pair):
    torch_model, model, variables, images = pair
    # A copy: training mode updates the running statistics, and the module's other tests
    # must see the fixture's model as built, whatever order they run in.
    torch_model = copy.deepcopy(torch_model).train()
    with torch.no_grad():
        expected = torch_model(images).numpy()
    got, updates = model.apply(variables, to_nhwc(images), train=True, mutable=["batch_stats", "gar"])
    print(f"train logits max abs difference: {np.abs(np.asarray(got) - expected).max():.2e}")
    assert np.abs(np.asarray(got) - expected).max() <= LOGIT_TOLERANCE

    torch_after = torch_state_dict(torch_model)
    flat_updates = traverse_util.flatten_dict(updates)
    for row in key_table(model, "authors"):
        if row.collection == "batch_stats":
            np.testing.assert_allclose(flat_updates[("batch_stats",) + row.path], torch_after[row.torch_key], rtol=1e-4, atol=1e-5)


def torch_gradients(torch_model, images, labels) -> dict[str, np.ndarray]:
    torch_model.train()
    torch_model.zero_grad()
    torch.nn.functional.cross_entropy(torch_model(images), torch.as_tensor(labels)).backward()
    return {key: p.grad.double().numpy() for key, p in torch_model.named_parameters()}


def jax_gradients(model, variables, images, labels) -> dict[str, np.ndarray]:
    """Cross-entropy gradients in training mode, keyed like the PyTorch parameters."""

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats", "gar"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()

    # Compiled: three times less CPU than op by op (measured 11 s vs 33 s at 112 px), same function.
    grads = jax.jit(jax.grad(loss))(variables["params"])
    state = flax_to_torch({"params": grads, "batch_stats": variables["batch_stats"]}, model)
    return {key: np.asarray(value, np.float64) for key, value in state.items()}


def relative_errors(got: dict, expected: dict) -> dict[str, float]:
    return {key: float(np.linalg.norm(got[key] - ref) / max(np.linalg.norm(ref), 1e-30)) for key, ref in expected.items()}


@pytest.fixture(scope="module")
def gradient_case():
    """A model pair at the smaller input size, with PyTorch's float64 gradients as the exact reference."""
    torch_model, model, variables, images = make_pair(112, seed=2)
    labels = np.arange(BATCH) % 7
    exact = torch_gradients(copy.deepcopy(torch_model).double(), images.double(), labels)
    return torch_model, model, variables, images, labels, exact


@pytest.mark.slow  # fast tier: full-model gradients in float64 (132 s under load)
def test_gradients_match_in_float64(gradient_case):
    """Same function, same gradients: compared in float64 on both sides.

    In float32 both frameworks are up to ~1e-2 away from the exact gradient,
    depending on which near-zero ReLU inputs their rounding puts on the other
    side (see the float32 test), so a float32-vs-float32 comparison measures
    rounding, not the implementation.
    """
    torch_model, model, variables, images, labels, expected = gradient_case
    model64 = with_runtime(model, dtype=jnp.float64, param_dtype=jnp.float64)
    with jax.enable_x64(True):
        variables64 = jax.tree.map(lambda a: np.asarray(a, np.float64) if a.dtype.kind == "f" else a, variables)
        got = jax_gradients(model64, variables64, jnp.asarray(to_nhwc(images), jnp.float64), labels)
    errors = relative_errors(got, expected)
    assert set(errors) == {key for key, _ in torch_model.named_parameters()}
    worst = max(errors, key=errors.get)
    print(f"float64 worst relative gradient error: {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= GRADIENT_RELATIVE_TOLERANCE, (worst, errors[worst])


# Measured on an AMD EPYC CPU (2 cores), 112 px, seed 2 (issue 12): with the float64 forward's ReLU
# decisions, arm-jax's worst float32 tensor is 1.6e-5 from the float64 gradient (median 2.4e-6; PyTorch
# 1.0e-5, median 3.7e-6). Its own decisions flip no ReLU there with the default Eigen convs (same 1.6e-5),
# two with YNNPACK's convs (5.5e-3; 3.3e-3 on a Xeon); all 17 ReLU inputs within the float32 forward's
# error of zero flipped at once give 2.9e-2, the sum of their single effects 6.6e-2. Compiled
# (jax.jit, as now): 1.0e-5 with the float64 decisions, 3.3e-3 with its own (a fused program
# rounds differently and flips some of those ReLUs; the bound below covers all of them).
FLOAT32_GRADIENT_TOLERANCE = 1e-4
FLOAT32_GRADIENT_TOLERANCE_FREE_RELUS = 1e-1
RELUS_IN_RESNET18 = 17


def relu_masks(model, variables, images, monkeypatch) -> list[np.ndarray]:
    """Where each ReLU input is positive in one training-mode forward, in call order."""
    masks, relu = [], nn.relu

    def recording_relu(x):
        masks.append(np.asarray(x) > 0)
        return relu(x)

    monkeypatch.setattr(nn, "relu", recording_relu)
    model.apply(variables, images, train=True, mutable=["batch_stats", "gar"])
    monkeypatch.setattr(nn, "relu", relu)
    return masks


@pytest.mark.slow  # fast tier: three full-model passes, two with gradients (320 s under load)
def test_float32_gradients_are_close_to_float64(gradient_case, monkeypatch):
    """arm-jax's float32 gradients against the float64 gradient, with absolute bounds.

    A ReLU input within the float32 forward's rounding error of zero (about 1e-6..5e-5 in
    absolute terms here; 17 such among 2.3M inputs in this case) passes or blocks its
    gradient depending on how the CPU's kernels round, and one such flip moves whole
    tensors by up to 2e-2. Which of them flip differs between machines and between
    frameworks, so the tight bound is checked with the float64 forward's ReLU decisions
    imposed on the float32 run; the free run gets a bound that covers all of them flipping.
    """
    torch_model, model, variables, images, labels, exact = gradient_case
    model64 = with_runtime(model, dtype=jnp.float64, param_dtype=jnp.float64)
    with jax.enable_x64(True):
        variables64 = jax.tree.map(lambda a: np.asarray(a, np.float64) if a.dtype.kind == "f" else a, variables)
        masks = relu_masks(model64, variables64, jnp.asarray(to_nhwc(images), jnp.float64), monkeypatch)
    assert len(masks) == RELUS_IN_RESNET18

    pending = list(masks)
    monkeypatch.setattr(nn, "relu", lambda x: jnp.where(pending.pop(0), x, 0))
    # HIGHEST is the default on CPU (same bits); on GPUs float32 convs would otherwise run in TF32.
    with jax.default_matmul_precision("highest"):
        pinned = relative_errors(jax_gradients(model, variables, to_nhwc(images), labels), exact)
        assert not pending
        monkeypatch.undo()
        free = relative_errors(jax_gradients(model, variables, to_nhwc(images), labels), exact)
    worst_pinned, worst_free = max(pinned, key=pinned.get), max(free, key=free.get)
    print(
        f"float32 relative gradient error: float64 ReLU decisions {pinned[worst_pinned]:.2e} ({worst_pinned}),"
        f" median {np.median(list(pinned.values())):.2e}; own decisions {free[worst_free]:.2e} ({worst_free})"
    )
    assert pinned[worst_pinned] <= FLOAT32_GRADIENT_TOLERANCE, (worst_pinned, pinned[worst_pinned])
    assert free[worst_free] <= FLOAT32_GRADIENT_TOLERANCE_FREE_RELUS, (worst_free, free[worst_free])


def test_torchvision_classifier_matches_plain_resnet18():
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(1)
    torch_model = TorchResNet18(num_classes=1000).eval()
    randomise_batchnorm(torch_model, generator)
    variables = torch_to_flax(torch_state_dict(torch_model))
    model = ARMResNet18(num_classes=1000, arrangement=False, de_albino=False, affinity=False)
    images = torch.randn(2, 3, 224, 224, generator=generator)
    with torch.no_grad():
        expected = torch_model(images).numpy()
    got = np.asarray(model.apply(variables, to_nhwc(images), train=False))
    assert np.abs(got - expected).max() <= LOGIT_TOLERANCE
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert n_params == sum(p.numel() for p in torch_model.parameters()) == 11_689_512


def test_parameter_tree_matches_key_table():
    model = ARMResNet18(num_classes=7)
    torch_model = TorchARMResNet18(num_classes=7)
    variables = convert_for_model(torch_state_dict(torch_model), model)
    flax_count = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert flax_count == sum(p.numel() for p in torch_model.parameters())
    torch_keys = {k for k in torch_model.state_dict() if not k.endswith("num_batches_tracked")}
    assert {row.torch_key for row in key_table(model, "authors")} == torch_keys
