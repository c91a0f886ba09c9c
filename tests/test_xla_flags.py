"""arm_jax.configure_cpu() (called by the arm-jax command, not by `import arm_jax`) sets the XLA:CPU
YNN flag before JAX starts, unless the user opted out or set it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arm_jax.xla_flags import YNN_FUSION_FLAG, jaxlib_knows_ynn_flag, merged_xla_flags

FLAG = f"{YNN_FUSION_FLAG}=-individual_convolution"


@pytest.mark.parametrize(
    ("xla_flags", "tuning", "knows", "expected"),
    [
        (None, None, True, FLAG),
        ("", None, True, FLAG),
        ("--xla_force_host_platform_device_count=4", None, True, f"--xla_force_host_platform_device_count=4 {FLAG}"),
        (f"{YNN_FUSION_FLAG}=individual_convolution", None, True, f"{YNN_FUSION_FLAG}=individual_convolution"),
        (f"--a=1 {YNN_FUSION_FLAG}= --b", None, True, f"--a=1 {YNN_FUSION_FLAG}= --b"),
        ("--a=1", "0", True, "--a=1"),
        (None, "off", True, None),
        (None, "1", True, FLAG),
        ("--a=1", None, False, "--a=1"),
        (None, None, False, None),
        # A flag that only starts with the same name is another flag.
        (f"{YNN_FUSION_FLAG}_x=1", None, True, f"{YNN_FUSION_FLAG}_x=1 {FLAG}"),
    ],
)
def test_merged_xla_flags(xla_flags, tuning, knows, expected):
    assert merged_xla_flags(xla_flags, tuning, knows) == expected


def _debug_options_ynn_lines(tmp_path: Path, env: dict) -> list[str]:
    """Compile one conv in a fresh process that calls arm_jax.configure_cpu() as the CLI does, and read the
    YNN lines of XLA's dumped options."""
    dump = tmp_path / "dump"
    # This process's own XLA_FLAGS already carries the flag (conftest.py configured it): start clean.
    env = {**os.environ, "XLA_FLAGS": "", **env}
    env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_dump_to={dump}".strip()
    code = (
        "import arm_jax; arm_jax.configure_cpu()\n"
        "import jax, jax.numpy as jnp\n"
        "jax.jit(lambda x: jax.lax.conv_general_dilated(x, x, (1, 1), 'SAME'))(jnp.ones((1, 1, 4, 4)))\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    options = sorted(dump.glob("*.debug_options"))
    assert options, "XLA wrote no debug options"
    return [line for line in options[-1].read_text().splitlines() if "ynn_fusion_type" in line]


@pytest.mark.skipif(not jaxlib_knows_ynn_flag(), reason="this jaxlib has no YNN fusion flag")
@pytest.mark.slow  # fast tier: subprocesses that import JAX and dump XLA's options (40 s under load)
def test_configure_cpu_gives_convolutions_back_to_eigen(tmp_path):
    lines = _debug_options_ynn_lines(tmp_path / "on", {"ARM_JAX_XLA_CPU_TUNING": ""})  # also in a session run with =0
    assert lines and not any("INDIVIDUAL_CONVOLUTION" in line for line in lines)  # dots and reductions stay
    assert _debug_options_ynn_lines(tmp_path / "off", {"ARM_JAX_XLA_CPU_TUNING": "0"}) == []  # XLA's default
    own = f"{YNN_FUSION_FLAG}=individual_convolution"
    assert _debug_options_ynn_lines(tmp_path / "own", {"XLA_FLAGS": own, "ARM_JAX_XLA_CPU_TUNING": ""}) == [
        "xla_cpu_experimental_ynn_fusion_type: LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    ]


def test_importing_arm_jax_leaves_the_environment_alone_and_the_command_applies_the_tuning():
    """A notebook's `import arm_jax` changes nothing in its process; the `arm-jax` command (here
    its click group, as the console script calls it) sets the flag before a command imports JAX."""
    code = (
        "import json, os\n"
        "before = dict(os.environ)\n"
        "import arm_jax, arm_jax.models, arm_jax.data.pipeline, arm_jax.training.loop, arm_jax.inference.predict\n"
        "imported = dict(os.environ)\n"
        "from cli.main import cli\n"
        "cli(['--help'], standalone_mode=False)\n"
        "print(json.dumps([imported == before, os.environ['XLA_FLAGS']]))\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_enable_fast_math=false", "ARM_JAX_XLA_CPU_TUNING": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    unchanged, flags = json.loads(done.stdout.strip().splitlines()[-1])
    assert unchanged
    expected = merged_xla_flags("--xla_cpu_enable_fast_math=false", "", jaxlib_knows_ynn_flag())
    assert flags == expected and flags.startswith("--xla_cpu_enable_fast_math=false")
