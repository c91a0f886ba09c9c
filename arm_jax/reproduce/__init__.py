"""Reproducing the paper: its experiments as rows of training runs, run, collected and drawn.

`targets` holds the paper's rows and numbers, `plan` turns a target and the user's options into
training configs (and the equivalent `arm-jax` commands, or a SLURM array), `runner` trains and
evaluates each row through `arm_jax.training.loop.train` and `arm_jax.inference.evaluate`,
`results` gathers what the row workdirs hold into results.json / results.md, `figures` draws
Figures 5 and 6 (with `plots`, PIL only), and `job.reproduce` is what `arm-jax reproduce` calls.
`curves` summarises whole training runs of two frameworks for scripts/compare_training.py.
"""
