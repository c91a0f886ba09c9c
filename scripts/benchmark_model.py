"""Images/s of ARM-ResNet-18 in arm-jax and in the PyTorch reference model, interleaved in one process.

    python scripts/benchmark_model.py                      # CPU: forward + train, 112 and 224 px, batch 32, float32
    python scripts/benchmark_model.py --image-size 224 --batch 32 --modes train --rounds 9
    python scripts/benchmark_model.py --device gpu --batch 256 --image-size 224 --json out.json
    python scripts/benchmark_model.py --layers --image-size 224   # per conv layer and the rest, ms

Run from the repository root (the PyTorch model is the one the parity tests
build, arm_jax/interop/torch_reference.py). Every contender is warmed up, then the steps
run in turns (A, B, C, A, B, C, ...) so that a change in machine load hits all
of them alike; each rate is the median over the rounds. The load average is
printed with every measurement: on a shared machine PyTorch slows ~4x under
contention and JAX ~2x, so compare numbers from one quiet run only.

CPU: arm-jax float32 against PyTorch float32 (default NCHW and channels_last),
PyTorch with as many threads as cores. GPU: arm-jax bfloat16 and float32
against PyTorch float32, AMP (bfloat16 autocast) and, where it works,
torch.compile of the AMP model; all PyTorch variants channels_last with
cudnn.benchmark. The training step is the same in both: forward in training
mode, softmax cross-entropy, backward, Adam with weight decay.
"""

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ and arm_jax from a checkout

import arm_jax  # noqa: E402

arm_jax.configure_cpu()  # XLA_FLAGS, before JAX starts its backend: as the arm-jax command runs
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from arm_jax.interop.pretrained import init_variables  # noqa: E402
from arm_jax.models import ARMResNet18  # noqa: E402
from arm_jax.models.resnet import largest_activation_bytes  # noqa: E402
from arm_jax.xla_flags import training_compiler_options  # noqa: E402

import results_table  # noqa: E402  (scripts/, beside this file)

NUM_CLASSES = 7
# Column names in scripts/README.md's tables for the PyTorch variants.
TORCH_LABELS = {"float32": "NCHW", "float32-cl": "channels_last", "amp-bf16": "AMP bf16",
                "compile-amp-bf16": "torch.compile AMP bf16"}
MODE_LABELS = {"forward": "forward", "train": "training step"}


def jax_runner(mode: str, batch: int, size: int, dtype_name: str):
    """A callable running one forward pass or training step of arm-jax, blocking until done."""
    dtype = jnp.dtype(dtype_name)
    model = ARMResNet18(num_classes=NUM_CLASSES, image_size=size, dtype=dtype)
    variables = init_variables(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3)).astype(dtype)
    labels = jnp.arange(batch) % NUM_CLASSES
    if mode == "forward":
        forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
        return lambda: forward(variables, x).block_until_ready()
    optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3))
    state = {"variables": variables, "opt": optimizer.init(variables["params"])}

    options = training_compiler_options(largest_activation_bytes(batch, size))  # as `arm-jax train`

    @partial(jax.jit, compiler_options=options)
    def step(variables, opt_state, x):
        def loss(params):
            logits, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats", "gar"])
            losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
            return losses.mean(), updates

        (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        changes, opt_state = optimizer.update(grads, opt_state, variables["params"])
        return {**updates, "params": optax.apply_updates(variables["params"], changes)}, opt_state

    def run():
        state["variables"], state["opt"] = step(state["variables"], state["opt"], x)
        jax.block_until_ready(state["variables"])

    return run


def torch_runner(mode: str, batch: int, size: int, variant: str, device: str):
    """A callable for the PyTorch model; variant: 'float32', 'float32-cl', 'amp-bf16', 'compile-amp-bf16'."""
    import torch

    from arm_jax.interop.torch_reference import TorchARMResNet18

    torch.manual_seed(0)
    model = TorchARMResNet18(num_classes=NUM_CLASSES, image_size=size).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    labels = (torch.arange(batch) % NUM_CLASSES).to(device)
    if variant != "float32":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    amp = "amp" in variant
    net = torch.compile(model) if variant.startswith("compile") else model
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def autocast():
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp)

    if mode == "forward":
        model.eval()

        def run_forward():
            with torch.no_grad(), autocast():
                net(x)
            sync()

        return run_forward
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)

    def run_train():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(net(x).float(), labels)
        loss.backward()
        optimizer.step()
        sync()

    return run_train


def contenders(args) -> dict[str, tuple]:
    """name -> (framework, variant): what this call compares."""
    if args.device == "gpu":
        jax_dtypes = args.dtype or ["bfloat16", "float32"]
        torch_variants = ["float32-cl", "amp-bf16"] + ([] if args.no_compile else ["compile-amp-bf16"])
    else:
        jax_dtypes = args.dtype or ["float32"]
        torch_variants = ["float32", "float32-cl"]
    found = {f"arm-jax {d}": ("jax", d) for d in jax_dtypes}
    if not args.no_torch:
        found.update({f"PyTorch {v}": ("torch", v) for v in torch_variants})
    return found


def interleaved_rates(runners: dict, batch: int, rounds: int, warmup: int, inner: int) -> dict[str, float]:
    """Images/s per runner: warm each up, then time them in turns; median over `rounds` turns of `inner` calls."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(inner):
                run()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: batch / float(np.median(t)) for name, t in times.items()}


def build_runners(args, mode: str, size: int) -> dict:
    runners = {}
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    for name, (framework, variant) in contenders(args).items():
        try:
            if framework == "jax":
                runners[name] = jax_runner(mode, args.batch, size, variant)
            else:
                runners[name] = torch_runner(mode, args.batch, size, variant, torch_device)
            runners[name]()  # compile now, so that a contender that cannot run is dropped, not fatal
        except Exception as error:  # torch.compile needs a compiler toolchain some machines lack
            print(f"  {name}: skipped ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
            runners.pop(name, None)
    return runners


def resnet_convs(size: int) -> list[tuple]:
    """(name, count, input side, in channels, out channels, kernel, stride, padding) of ResNet-18's convs."""
    side = -(-size // 4)  # after conv1 and the max-pool
    convs = [("conv1 7x7/2", 1, size, 3, 64, 7, 2, 3), ("layer1 3x3", 4, side, 64, 64, 3, 1, 1)]
    for stage, width in ((2, 128), (3, 256), (4, 512)):
        half = -(-side // 2)
        convs += [(f"layer{stage}_0.conv1 3x3/2", 1, side, width // 2, width, 3, 2, 1),
                  (f"layer{stage} 3x3", 3, half, width, width, 3, 1, 1),
                  (f"layer{stage}_0.downsample 1x1/2", 1, side, width // 2, width, 1, 2, 0)]
        side = half
    return convs


def layer_runners(mode: str, batch: int, conv: tuple, torch_variants: list[str]) -> dict:
    """One conv, arm-jax's Conv module against torch.nn.functional.conv2d: its output alone
    (mode 'forward', no gradient kept), or output and both gradients (mode 'train')."""
    import torch

    from arm_jax.models.resnet import Conv

    _, _, side, cin, cout, k, stride, pad = conv
    first = cin == 3  # the image needs no gradient
    module = Conv(cout, k, stride, pad)
    x = jax.random.normal(jax.random.key(0), (batch, side, side, cin))
    params = module.init(jax.random.key(1), x)

    @jax.jit
    def step(params, x):
        if mode == "forward":
            return module.apply(params, x)
        out, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
        grads = vjp(jnp.ones_like(out))
        return grads[0] if first else grads

    runners = {"arm-jax float32": lambda: jax.block_until_ready(step(params, x))}
    for variant in torch_variants:
        layout = torch.channels_last if variant.endswith("-cl") else torch.contiguous_format
        train = mode == "train"
        tx = torch.randn(batch, cin, side, side).contiguous(memory_format=layout).requires_grad_(train and not first)
        tw = torch.randn(cout, cin, k, k).contiguous(memory_format=layout).requires_grad_(train)

        def run(tx=tx, tw=tw, train=train):
            with torch.set_grad_enabled(train):
                out = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad)
            if train:
                out.backward(torch.ones_like(out))
                tw.grad = tx.grad = None

        runners[f"PyTorch {variant}"] = run
    return runners


def stage_runners(batch: int, size: int, torch_variants: list[str]) -> dict[str, dict]:
    """Stage -> contender -> a callable running that stage's forward pass (inference mode) alone.

    arm-jax: each stage of the real model's modules jitted apart, on its own variables, with
    the output of the stage before it as input (the stem repeats ResNet18Backbone's first
    four lines); PyTorch: the children of the reference model's `features`.
    """
    import torch

    from arm_jax.models.batchnorm import BatchNorm
    from arm_jax.models.pooling import max_pool
    from arm_jax.models.resnet import BasicBlock, ResNet18Backbone, conv
    from arm_jax.interop.torch_reference import TorchARMResNet18

    model = ARMResNet18(num_classes=NUM_CLASSES, image_size=size)
    variables = init_variables(model, jax.random.key(0))

    def sub(*path):  # the variables of one submodule
        found = {}
        for collection in ("params", "batch_stats"):
            tree = variables[collection]
            for name in path:
                tree = tree.get(name, {})
            if tree:
                found[collection] = tree
        return found

    def stem(x):
        x = conv(64, 7, 2, 3, jnp.float32, jnp.float32, "conv1").apply(sub("backbone", "conv1"), x)
        x = BatchNorm().apply(sub("backbone", "bn1"), x, train=False)
        return max_pool(jax.nn.relu(x), 3, 2, 1)

    def stage(index):
        def run(x):
            for block in range(2):
                module = BasicBlock(64 * 2 ** (index - 1), 2 if index > 1 and block == 0 else 1,
                                    jnp.float32, jnp.float32, None)
                x = module.apply(sub("backbone", f"layer{index}_{block}"), x, train=False)
            return x
        return run

    jax_fns = {"stem (conv1, bn1, relu, max pool)": stem, **{f"layer{i} (2 blocks)": stage(i) for i in range(1, 5)},
               "backbone (one jit)": lambda x: ResNet18Backbone().apply(sub("backbone"), x, train=False),
               "whole model (one jit)": lambda x: model.apply(variables, x, train=False)}
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
    jax_inputs, y = {}, x
    for name, fn in list(jax_fns.items())[:5]:
        jax_inputs[name], y = y, jax.jit(fn)(y)
    found = {}
    for name, fn in jax_fns.items():
        jitted, given = jax.jit(fn), jax_inputs.get(name, x)
        found[name] = {"arm-jax float32": lambda jitted=jitted, given=given: jax.block_until_ready(jitted(given))}
    torch.manual_seed(0)
    for variant in torch_variants:
        layout = torch.channels_last if variant.endswith("-cl") else torch.contiguous_format
        net = TorchARMResNet18(num_classes=NUM_CLASSES, image_size=size).eval().to(memory_format=layout)
        children = list(net.features.children())
        torch_fns = [torch.nn.Sequential(*children[:4]), *children[4:8], net.features, net]
        y = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
        for index, (name, fn) in enumerate(zip(jax_fns, torch_fns)):
            given = y if index < 5 else torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
            with torch.no_grad():
                if index < 5:
                    y = fn(y)

            def run(fn=fn, given=given):
                with torch.no_grad():
                    fn(given)

            found[name][f"PyTorch {variant}"] = run
    return found


def label(contender: str) -> str:
    """A contender's column name in scripts/README.md ('PyTorch float32-cl' -> 'PyTorch channels_last')."""
    framework, _, variant = contender.partition(" ")
    return f"PyTorch {TORCH_LABELS[variant]}" if framework == "PyTorch" else contender


def stage_breakdown(args, size: int, variants: list[str]) -> dict[str, dict[str, float]]:
    """Per stage of the model, forward pass in inference mode, ms per batch, interleaved."""
    print(f"per stage, forward (inference mode), ms, {size}x{size}, batch {args.batch} "
          f"(load {os.getloadavg()[0]:.2f})")
    rows = {}
    for name, runners in stage_runners(args.batch, size, variants).items():
        rows[name] = {n: 1e3 / rate for n, rate in interleaved_rates(runners, 1, args.rounds, args.warmup, 1).items()}
        print(f"  {name:36s} " + "  ".join(f"{n} {v:7.1f}" for n, v in rows[name].items()))
    names = list(rows)
    head = {n: rows[names[-1]][n] - rows[names[-2]][n] for n in rows[names[-1]]}
    print(f"  {'head (ARM, fc): whole - backbone':36s} " + "  ".join(f"{n} {v:7.1f}" for n, v in head.items()))
    return {**rows, "head (ARM, fc): whole - backbone": head}


def layer_breakdown(args) -> list[dict[str, str]]:
    """Per conv layer of ResNet-18, ms per batch, interleaved; then the whole model, and what
    it spends outside its convs (BatchNorm, ReLU, residual adds, max pool, ARM, loss, Adam).
    Returns the rows of scripts/README.md's table (one per part)."""
    variants = [v for _, (framework, v) in contenders(args).items() if framework == "torch"]
    what = {"forward": "forward (inference mode)", "train": "forward + both gradients"}
    names = [n for n in contenders(args) if n == "arm-jax float32" or n.startswith("PyTorch")]
    stamp, table = results_table.stamp(), []

    def record(run: str, part: str, ms: dict[str, float]) -> None:
        table.append({**stamp, "run": run, "part": part,
                      **{f"{label(n)} ms": f"{ms[n]:.1f}" if n in ms else "-" for n in names}})

    for size in args.image_size:
        for mode in args.modes:
            run = f"{what[mode]}, {size} px, batch {args.batch}"
            if mode == "forward":
                for part, ms in stage_breakdown(args, size, variants).items():
                    record(run, part, ms)
            convs: dict[str, float] = {}
            print(f"per conv layer, {what[mode]}, ms, {size}x{size}, batch {args.batch} "
                  f"(load {os.getloadavg()[0]:.2f})")
            for conv in resnet_convs(size):
                runners = layer_runners(mode, args.batch, conv, variants)
                ms = {name: 1e3 / rate for name, rate in
                      interleaved_rates(runners, 1, args.rounds, args.warmup, 1).items()}
                for name, value in ms.items():
                    convs[name] = convs.get(name, 0.0) + conv[1] * value
                print(f"  {conv[0]:28s} x{conv[1]}  " + "  ".join(f"{n} {v:7.1f}" for n, v in ms.items()))
                record(run, f"{conv[0]} x{conv[1]} (each)", ms)
            whole = {name: 1e3 / rate for name, rate in interleaved_rates(
                build_runners(args, mode, size), 1, args.rounds, args.warmup, 1).items()}
            if not whole:
                continue
            for part, values in (("all convs (x count)", convs), ("whole model", whole),
                                 ("outside the convs", {n: whole[n] - convs[n] for n in whole})):
                print(f"  {part:32s} " + "  ".join(f"{n} {values[n]:7.1f}" for n in whole))
                record(run, part, values)
    return table


def summary_rows(args, results: list[dict]) -> list[dict[str, str]]:
    """scripts/README.md's rows: images/s per contender and arm-jax / each PyTorch variant."""
    names = list(contenders(args))
    stamp, rows = results_table.stamp(), []
    for result in results:
        rates = result["images_per_s"]
        ours = next((rates[n] for n in names if n.startswith("arm-jax") and n in rates), None)
        row = {**stamp, "run": f"{MODE_LABELS[result['mode']]}, {result['image_size']} px, batch {args.batch}",
               "load average": "{:.2f} -> {:.2f}".format(*result["load_average"])}
        row.update({label(n): f"{rates[n]:.1f}" if n in rates else "-" for n in names})
        for n in (n for n in names if n.startswith("PyTorch")):
            ratio = ours / rates[n] if ours and n in rates else None
            row[f"arm-jax / {TORCH_LABELS[n.split(' ', 1)[1]]}"] = f"{ratio:.2f}" if ratio else "-"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--modes", nargs="+", choices=("forward", "train"), default=["forward", "train"])
    parser.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), help="arm-jax compute dtypes")
    parser.add_argument("--rounds", type=int, default=7, help="timed turns per contender (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--inner", type=int, default=None, help="calls per turn (default 1 on CPU, 10 on GPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch CPU threads")
    parser.add_argument("--no-torch", action="store_true", help="arm-jax only")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--layers", action="store_true", help="per conv layer, then the whole model and its time outside the convs "
                             "(CPU, float32; --modes picks forward and/or train) instead")
    results_table.add_option(parser)
    args = parser.parse_args()
    inner = args.inner or (10 if args.device == "gpu" else 1)
    header = {
        "jax_device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_cores": os.cpu_count(),
        "batch": args.batch,
    }
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.threads)
        torch.backends.cudnn.benchmark = True
        header.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    print("; ".join(f"{k}={v}" for k, v in header.items()))
    if args.layers:
        rows = layer_breakdown(args)
        if args.markdown and rows:
            results_table.write_rows(args.markdown, "benchmark_model layers", rows, key=("machine", "run"))
        return
    results = []
    for size in args.image_size:
        for mode in args.modes:
            runners = build_runners(args, mode, size)
            load_before = os.getloadavg()[0]
            rates = interleaved_rates(runners, args.batch, args.rounds, args.warmup, inner)
            load_after = os.getloadavg()[0]
            print(f"{mode}, {size}x{size}, batch {args.batch}  (load average {load_before:.2f} -> {load_after:.2f}, "
                  f"{args.rounds} interleaved rounds of {inner})")
            reference = next((rates[n] for n in rates if n.startswith("PyTorch")), None)
            for name, rate in rates.items():
                ratio = f"  {rate / reference:5.2f}x first PyTorch" if reference else ""
                print(f"  {name:28s} {rate:9.1f} images/s{ratio}")
            jax_names = [n for n in rates if n.startswith("arm-jax")]
            for jax_name in jax_names:
                for torch_name in (n for n in rates if n.startswith("PyTorch")):
                    print(f"  ratio {jax_name} / {torch_name}: {rates[jax_name] / rates[torch_name]:.2f}")
            results.append({"mode": mode, "image_size": size, "images_per_s": rates,
                            "load_average": [load_before, load_after]})
            del runners
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**header, "results": results}, indent=1))
    if args.markdown:
        machine = None if args.device == "cpu" else f"{header['jax_device']} (host: {results_table.cpu()})"
        rows = [{**row, "machine": machine or row["machine"]} for row in summary_rows(args, results)]
        results_table.write_rows(args.markdown, f"benchmark_model {args.device}", rows)


if __name__ == "__main__":
    main()
