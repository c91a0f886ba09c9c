"""`arm-jax export`: the whole inference path as one ONNX graph (and optionally StableHLO).

The ONNX graph takes `image`, uint8 (N, S, S, 3) RGB at the model's input size
with a free batch dimension, normalises it with ImageNet's mean and std, runs
the network with the *running* GAR folded in as a constant (so every image's
answer is independent of its batch-mates) and returns `logits` and
`probabilities`. Class names, the architecture and the input convention are in
the model's metadata_props.

The graph is written node by node from the model's variables (NCHW Conv,
BatchNormalization, MaxPool, DepthToSpace for the arrangement, a grouped Conv
for De-albino). Measured against the jax2onnx route (0.17.1, tracing the Flax
model) on this 2-core machine: jax2onnx took 45-60 s per export, lowered
`nn.max_pool` to a 4-D MaxPool onnxruntime rejects ("Unsupported pooling
size", needing a jaxpr rewrite), emitted ~700 nodes (Concat/Expand/GatherND
around every conv) and pins orbax-checkpoint<0.11.37; this builder needs only
`onnx`, exports in about a second, and onnxruntime fuses its Conv+BN graph.
The tests hold it to the JAX model (tests/test_export.py).
"""

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from arm_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from arm_jax.errors import UserError
from arm_jax.forward import inference_fn
from arm_jax.interop.model_files import LoadedModel, load_any_model
from arm_jax.models import ARMResNet18, architecture
from arm_jax.models.resnet import BLOCKS_PER_STAGE, STAGE_WIDTHS

OPSET = 17
BN_EPSILON = 1e-5  # arm_jax.models.batchnorm.BatchNorm's, as PyTorch's


class GraphBuilder:
    """Collects nodes and initializers; each method returns the name of its output."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def constant(self, stem: str, value: np.ndarray) -> str:
        name = self._name(stem)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, output: str | None = None, **attributes) -> str:
        output = output or self._name(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self._name(op_type), **attributes))
        return output


def _f32(value: Any) -> np.ndarray:
    return np.asarray(value, np.float32)


def _conv(graph: GraphBuilder, x: str, kernel_hwio: np.ndarray, stride: int, padding: int, name: str) -> str:
    weight = graph.constant(f"{name}.weight", _f32(kernel_hwio).transpose(3, 2, 0, 1))  # HWIO -> OIHW
    return graph.op("Conv", [x, weight], name, strides=[stride, stride], pads=[padding] * 4)


def _batchnorm(graph: GraphBuilder, x: str, params: dict, stats: dict, name: str) -> str:
    inputs = [graph.constant(f"{name}.{key}", _f32(value)) for key, value in
              (("scale", params["scale"]), ("bias", params["bias"]), ("mean", stats["mean"]), ("var", stats["var"]))]
    return graph.op("BatchNormalization", [x, *inputs], name, epsilon=BN_EPSILON)


def _backbone(graph: GraphBuilder, x: str, params: dict, stats: dict) -> str:
    """torchvision resnet18 up to layer4, NCHW."""
    x = _conv(graph, x, params["conv1"]["kernel"], 2, 3, "conv1")
    x = graph.op("Relu", [_batchnorm(graph, x, params["bn1"], stats["bn1"], "bn1")])
    x = graph.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for stage in range(1, len(STAGE_WIDTHS) + 1):
        for block in range(BLOCKS_PER_STAGE):
            name = f"layer{stage}_{block}"
            p, s = params[name], stats[name]
            stride = 2 if stage > 1 and block == 0 else 1
            y = _conv(graph, x, p["conv1"]["kernel"], stride, 1, f"{name}.conv1")
            y = graph.op("Relu", [_batchnorm(graph, y, p["bn1"], s["bn1"], f"{name}.bn1")])
            y = _batchnorm(graph, _conv(graph, y, p["conv2"]["kernel"], 1, 1, f"{name}.conv2"), p["bn2"], s["bn2"],
                           f"{name}.bn2")
            residual = x
            if "downsample" in p:
                residual = _conv(graph, x, p["downsample"]["conv"]["kernel"], 2, 0, f"{name}.downsample")
                residual = _batchnorm(graph, residual, p["downsample"]["bn"], s["downsample"]["bn"],
                                      f"{name}.downsample.bn")
            x = graph.op("Relu", [graph.op("Add", [y, residual])])
    return x


def _arm_head(graph: GraphBuilder, x: str, model: ARMResNet18, variables: dict) -> str:
    """ARM as arm_jax.models.arm.ARM computes it at evaluation with the running GAR -> (N, features)."""
    params, stats = variables["params"].get("arm", {}), variables["batch_stats"].get("arm", {})
    channels, features = STAGE_WIDTHS[-1], x
    if model.arrangement:
        # DepthToSpace in CRD mode is torch.nn.PixelShuffle's channel order.
        x = graph.op("DepthToSpace", [x], "arrangement", blocksize=16, mode="CRD")
        channels //= 256
        kernel, stride = model.de_albino_kernel, model.de_albino_stride
    else:
        kernel, stride = model.raw_kernel, 1
    if model.de_albino:
        # One single-channel kernel shared by every channel: a grouped conv with the kernel repeated.
        shared = _f32(params["de_albino"]["kernel"])[:, :, 0, 0]
        weight = graph.constant("de_albino.weight", np.broadcast_to(shared, (channels, 1, kernel, kernel)))
        x = graph.op("Conv", [x, weight], "de_albino", strides=[stride, stride], group=channels)
    elif model.arrangement:
        x = graph.op("AveragePool", [x], "uniform_average", kernel_shape=[kernel, kernel], strides=[stride, stride])
    else:
        x = None
    if x is None:  # the plain ResNet: global average pooling
        representation = graph.op("ReduceMean", [features], "gap", axes=[2, 3], keepdims=0)
    else:
        x = _batchnorm(graph, x, params["bn"], stats["bn"], "arm.bn")
        representation = graph.op("ReduceMean", [x], "channel_mean", axes=[1], keepdims=0)
    if model.affinity:
        affinity = variables["gar"]["arm"]["affinity"]
        amend = _f32(params["affinity"]["alpha"]) * _f32(affinity["mean"])  # alpha * running GAR, as in float32
        representation = graph.op("Add", [representation, graph.constant("alpha_times_gar", amend)], "affinity")
    return graph.op("Flatten", [representation], "representation", axis=1)


def build_onnx(loaded: LoadedModel, *, source: str = "") -> onnx.ModelProto:
    """The ONNX model of `loaded` (which must have a running GAR), uint8 images in, logits and probabilities out."""
    model, variables = loaded.model, jax.tree.map(np.asarray, loaded.variables)
    if not loaded.gar_calibrated:
        raise UserError(f"{source or 'model'}: has no running GAR, so an exported model would have to depend on "
                        "the batch; run `arm-jax calibrate` on it first")
    size, names = model.image_size, class_names_of(loaded)
    graph = GraphBuilder()
    x = graph.op("Cast", ["image"], "pixels", to=TensorProto.FLOAT)
    x = graph.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
    # (x / 255 - mean) / std with transforms' constants, the order of arm_jax.forward's preprocessing.
    x = graph.op("Div", [x, graph.constant("255", np.float32(255.0))])
    x = graph.op("Sub", [x, graph.constant("imagenet_mean", _f32(IMAGENET_MEAN).reshape(1, 3, 1, 1))])
    x = graph.op("Div", [x, graph.constant("imagenet_std", _f32(IMAGENET_STD).reshape(1, 3, 1, 1))], "normalised")
    x = _backbone(graph, x, variables["params"]["backbone"], variables["batch_stats"]["backbone"])
    representation = _arm_head(graph, x, model, variables)
    fc = variables["params"]["fc"]
    weight, bias = graph.constant("fc.weight", _f32(fc["kernel"])), graph.constant("fc.bias", _f32(fc["bias"]))
    logits = graph.op("Gemm", [representation, weight, bias], output="logits")
    graph.op("Softmax", [logits], output="probabilities", axis=-1)
    batch = "N"
    onnx_graph = helper.make_graph(
        graph.nodes, "arm_resnet18",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [batch, size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, model.num_classes]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, model.num_classes])],
        graph.initializers,
    )
    proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="arm-jax", doc_string=f"ARM-ResNet-18 facial expression model ({source})")
    proto.ir_version = 8  # readable by onnxruntime >= 1.14
    metadata = {"class_names": json.dumps(list(names)), "image_size": str(size),
                "architecture": json.dumps(architecture(model)), "gar": "running",
                "input": "uint8 RGB (N, H, W, 3) at image_size; ImageNet mean/std applied inside"}
    helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def class_names_of(loaded: LoadedModel) -> tuple[str, ...]:
    """The model's class names, or class_0.. where it has none."""
    return loaded.class_names or tuple(f"class_{i}" for i in range(loaded.model.num_classes))


def jax_inference_fn(loaded: LoadedModel):
    """uint8 (N, S, S, 3) -> (logits, probabilities): inference_fn with `loaded`'s weights inside."""
    infer, variables = inference_fn(loaded.model), loaded.variables
    return lambda images: infer(variables, images)


# Every platform jax.export lowers for, whatever machine exports: the model's per-platform forms
# (models/per_platform.py) all go into the file, and the platform that compiles it keeps its own.
STABLEHLO_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_stablehlo(loaded: LoadedModel, path: Path) -> Path:
    """The same function serialised with jax.export (weights inside, batch symbolic, lowered for
    STABLEHLO_PLATFORMS): jax.export.deserialize reads it."""
    size = loaded.model.image_size
    (batch,) = jax.export.symbolic_shape("N")
    spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    exported = jax.export.export(jax.jit(jax_inference_fn(loaded)), platforms=STABLEHLO_PLATFORMS)(spec)
    path.write_bytes(exported.serialize())
    return path


def export_model(checkpoint: str | Path, output: str | Path, *, stablehlo: bool = False) -> list[Path]:
    """Write OUT.onnx (checked, and run once with onnxruntime) and optionally OUT.stablehlo; returns the paths."""
    output = Path(output)
    if output.suffix.lower() != ".onnx":
        raise UserError(f"{output}: the output file name must end in .onnx")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such folder for the output")
    loaded = load_any_model(checkpoint)
    proto = build_onnx(loaded, source=Path(checkpoint).name)
    onnx.save_model(proto, output)
    _smoke_run(output, loaded.model.image_size)
    written = [output]
    if stablehlo:
        written.append(export_stablehlo(loaded, output.with_suffix(".stablehlo")))
    return written


def _smoke_run(path: Path, size: int) -> None:
    """Load the written file in onnxruntime and run two images, so a broken export fails here, not in an app."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _, probabilities = session.run(None, {"image": np.zeros((2, size, size, 3), np.uint8)})
    if not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4):
        raise RuntimeError(f"{path}: onnxruntime returned probabilities that do not sum to 1")
