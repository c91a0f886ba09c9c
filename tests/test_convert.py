"""The converter on real files: torchvision, authors' checkpoint and plain state dicts; refusals."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from click.testing import CliRunner

from arm_jax.errors import UserError
from arm_jax.interop.convert import ConversionError, flax_to_torch, load_state_dict, save_safetensors, torch_to_flax
from arm_jax.interop.model_files import load_any_model, load_model_directory
from arm_jax.interop.pretrained import init_variables
from arm_jax.models import ARMResNet18
from cli.main import cli

torch = pytest.importorskip("torch")
from safetensors.torch import load_file as torch_load_safetensors

from arm_jax.interop.torch_reference import TorchARMResNet18, randomised_arm, randomised_resnet

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # the cheapest size the head accepts (33-64 px: arranged map 32x32, a 1x1 representation)


def torch_arm_model(seed: int = 0) -> TorchARMResNet18:
    return randomised_arm(seed, image_size=SIZE)


def logits_of(torch_model, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch_model(images).numpy()


def flax_logits(loaded, images: torch.Tensor) -> np.ndarray:
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    return np.asarray(loaded.model.apply(loaded.variables, x, train=False))


@pytest.fixture
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def test_torchvision_state_dict_file(tmp_path, images):
    reference = randomised_resnet(0)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    loaded = load_any_model(tmp_path / "resnet18.pth")
    assert (loaded.model.num_classes, loaded.model.arrangement, loaded.model.de_albino, loaded.model.affinity) == (1000, False, False, False)
    model = ARMResNet18(num_classes=1000, image_size=SIZE, arrangement=False, de_albino=False, affinity=False)
    got = np.asarray(model.apply(loaded.variables, jnp.asarray(images.permute(0, 2, 3, 1).numpy()), train=False))
    assert np.abs(got - logits_of(reference, images)).max() <= 1e-4


@pytest.mark.parametrize("prefix", ["module.", ""], ids=["dataparallel", "plain"])
def test_authors_checkpoint_with_and_without_dataparallel_prefix(tmp_path, images, prefix):
    reference = torch_arm_model()
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, weight_decay=1e-4)
    checkpoint = {
        "iter": 1234,
        "model_state_dict": {f"{prefix}{key}": value for key, value in reference.state_dict().items()},
        "optimizer_state_dict": optimizer.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "epoch70.pth")
    loaded = load_any_model(tmp_path / "epoch70.pth")
    assert loaded.model.image_size == SIZE and loaded.model.arrangement and not loaded.gar_calibrated
    assert np.abs(flax_logits(loaded, images) - logits_of(reference, images)).max() <= 1e-4


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_plain_authors_state_dict(tmp_path, images, suffix):
    reference = torch_arm_model(seed=3)
    path = tmp_path / f"arm{suffix}"
    state = {key: value.contiguous() for key, value in reference.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_safetensors({key: value.numpy() for key, value in state.items()}, path)
    loaded = load_any_model(path)
    assert np.abs(flax_logits(loaded, images) - logits_of(reference, images)).max() <= 1e-4


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file on load


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"fc.weight": torch.zeros(2, 2)}, "payload": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(UserError, match="refused"):
        load_state_dict(path)
    assert not marker.exists()
    legacy = tmp_path / "legacy.pt"  # a plain pickle, not torch's zip format
    legacy.write_bytes(pickle.dumps(RunsCodeWhenUnpickled(marker)))
    with pytest.raises(UserError, match="refused|not a readable"):
        load_state_dict(legacy)
    assert not marker.exists()


def test_unsupported_file_type_is_refused(tmp_path):
    (tmp_path / "weights.pkl").write_bytes(b"junk")
    with pytest.raises(UserError, match="unsupported weight file type"):
        load_state_dict(tmp_path / "weights.pkl")


def test_wrong_shape_missing_and_unexpected_keys_are_named():
    state = {key: value.numpy() for key, value in torch_arm_model().state_dict().items()}
    state["features.4.0.conv1.weight"] = np.zeros((64, 64, 5, 5), np.float32)
    del state["arm.bn.running_var"]
    state["arm.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as error:
        torch_to_flax(state, image_size=SIZE)
    message = str(error.value)
    assert "features.4.0.conv1.weight: file has (64, 64, 5, 5), model needs (64, 64, 3, 3)" in message
    assert "missing keys (1): arm.bn.running_var" in message
    assert "unexpected keys (1): arm.extra.weight" in message


@pytest.mark.slow  # fast tier: export and PyTorch round trip (23 s of CPU)
def test_export_round_trip_loads_into_pytorch(tmp_path, images):
    model = ARMResNet18(num_classes=7, image_size=SIZE)
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())
    variables = init_variables(model, jax.random.key(0))
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats", "gar"])  # non-trivial statistics
    variables = {**variables, **updates}
    save_safetensors(flax_to_torch(variables, model), tmp_path / "exported.safetensors")

    torch_model = TorchARMResNet18(num_classes=7, image_size=SIZE)
    torch_model.load_state_dict(torch_load_safetensors(str(tmp_path / "exported.safetensors")), strict=True)
    expected = np.asarray(ARMResNet18(num_classes=7, image_size=SIZE).apply(variables, x, train=False))
    assert np.abs(logits_of(torch_model.eval(), images) - expected).max() <= 1e-4

    again = torch_to_flax(load_state_dict(tmp_path / "exported.safetensors"), image_size=SIZE)
    for a, b in zip(jax.tree.leaves(again["params"]), jax.tree.leaves(variables["params"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cli_convert_writes_an_orbax_model_and_exports_it_back(tmp_path, images):
    reference = torch_arm_model(seed=4)
    torch.save(reference.state_dict(), tmp_path / "arm.pth")
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(tmp_path / "arm.pth"), str(tmp_path / "model"),
                                 "--class-names", "a,b,c,d,e,f,g"])
    assert result.exit_code == 0, result.output
    loaded = load_model_directory(tmp_path / "model")
    assert loaded.class_names == tuple("abcdefg")
    assert np.abs(flax_logits(loaded, images) - logits_of(reference, images)).max() <= 1e-4

    result = runner.invoke(cli, ["convert", str(tmp_path / "model"), str(tmp_path / "back.safetensors")])
    assert result.exit_code == 0, result.output
    back = torch_load_safetensors(str(tmp_path / "back.safetensors"))
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(back[key], value, rtol=0, atol=0)

    result = runner.invoke(cli, ["convert", str(tmp_path / "arm.pth"), str(tmp_path / "model")])
    assert result.exit_code == 2 and "not empty" in result.output  # never overwrites


def test_pretrained_backbone_initialisation(tmp_path):
    """Every backbone parameter AND BatchNorm statistic comes from the file; the head stays fresh."""
    reference = randomised_resnet(0)  # non-trivial running statistics, so missing ones show
    torch.save(reference.state_dict(), tmp_path / "imagenet.pth")
    model = ARMResNet18(num_classes=7, image_size=SIZE)
    fresh = init_variables(model, jax.random.key(0))
    pretrained = init_variables(model, jax.random.key(0), pretrained=tmp_path / "imagenet.pth")
    expected = torch_to_flax({k: v.numpy() for k, v in reference.state_dict().items()})
    for collection in ("params", "batch_stats"):
        got = traverse_util.flatten_dict(pretrained[collection]["backbone"])
        want = traverse_util.flatten_dict(expected[collection]["backbone"])
        assert set(got) == set(want)
        for path, value in want.items():
            np.testing.assert_array_equal(got[path], value, err_msg=f"{collection}/{'/'.join(path)}")
    for collection in ("params", "batch_stats"):  # the ARM head and fc keep their fresh values
        for name in ("arm", "fc"):
            for a, b in zip(jax.tree.leaves(pretrained[collection].get(name, {})),
                            jax.tree.leaves(fresh[collection].get(name, {})), strict=True):
                np.testing.assert_array_equal(a, b)


def test_export_with_torchvision_naming_loads_into_resnet18(tmp_path):
    """`arm-jax convert MODEL OUT.safetensors --naming torchvision`: conv1/layer1.. keys, strict load."""
    reference = randomised_resnet(1)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(tmp_path / "resnet18.pth"), str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["convert", str(tmp_path / "model"), str(tmp_path / "back.safetensors"),
                                 "--naming", "torchvision"])
    assert result.exit_code == 0, result.output
    back = torch_load_safetensors(str(tmp_path / "back.safetensors"))
    assert "layer1.0.conv1.weight" in back and not any(key.startswith("features.") for key in back)
    again = randomised_resnet(2)
    again.load_state_dict(back, strict=True)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def test_convert_script_reads_safetensors_without_pytorch(tmp_path, images):
    """`python scripts/convert_weights.py IN.safetensors OUT` in a process where torch cannot be imported."""
    reference = torch_arm_model(seed=5)
    save_safetensors({k: v.numpy() for k, v in reference.state_dict().items()}, tmp_path / "arm.safetensors")
    block_torch = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", block_torch, str(REPO / "scripts" / "convert_weights.py"),
                             str(tmp_path / "arm.safetensors"), str(tmp_path / "model")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = load_model_directory(tmp_path / "model")
    assert np.abs(flax_logits(loaded, images) - logits_of(reference, images)).max() <= 1e-4
