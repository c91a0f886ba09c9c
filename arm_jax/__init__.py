"""arm-jax: the ARM facial-expression model in JAX/Flax.

Importing the package changes nothing in the process. `arm_jax.configure_cpu()`, called
before JAX starts its backend, applies arm-jax's XLA:CPU tuning (convolutions on Eigen
instead of YNNPACK: ~2x faster CPU training); the `arm-jax` command calls it itself.
`ARM_JAX_XLA_CPU_TUNING=0` turns it off; see arm_jax/xla_flags.py.
"""

from arm_jax.xla_flags import configure_cpu

__all__ = ["configure_cpu"]
