"""arm-jax: the ARM facial-expression model in JAX/Flax.

Importing the package sets an XLA:CPU flag in `XLA_FLAGS` before JAX starts its
backend (convolutions on Eigen instead of YNNPACK: ~2x faster CPU training);
`ARM_JAX_XLA_CPU_TUNING=0` turns it off, see arm_jax/xla_flags.py.
"""

from arm_jax.xla_flags import apply_xla_cpu_tuning

apply_xla_cpu_tuning()
