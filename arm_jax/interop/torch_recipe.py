"""The released training recipe, in PyTorch, on arm-jax's data splits (scripts/compare_training.py).

Written from shared/REFERENCE.md, independently of arm_jax.data.transforms and arm_jax.training,
so that a whole arm-jax training run can be set beside a second implementation of the recipe:
- the model of the released code (`torch_reference.TorchARMResNet18`), PyTorch's default init;
- Adam(lr, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-4: L2 added to the gradient, every
  parameter, alpha included), ExponentialLR(gamma) stepped once per EPOCH, cross-entropy;
- per training image: with p 0.5 one of {horizontal flip, Gaussian noise of variance 30 on
  0..255, clipped and truncated to uint8 as the released code's astype does}; resize to the
  model's size (PIL bilinear, as torchvision's Resize on a PIL image), ToTensor, ImageNet
  Normalize, then RandomErasing (p 0.5, scale (0.02, 0.1), ratio (0.3, 3.3), value 0) drawn
  with torchvision's algorithm from a torch.Generator; gray images replicated to 3 channels;
- batches from a fresh shuffle each epoch, the last partial one dropped; validation in eval
  mode at batch 64 with the batch GAR, batches shuffled with a fixed generator (as arm-jax
  validates; the released test script used file order).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np
from PIL import Image

from arm_jax.interop.torch_reference import TorchARMResNet18, nn, torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NOISE_VARIANCE = 30.0
ERASE_P, ERASE_SCALE, ERASE_RATIO = 0.5, (0.02, 0.1), (0.3, 3.3)


@dataclasses.dataclass(frozen=True)
class Recipe:
    image_size: int = 224
    batch_size: int = 256
    epochs: int = 70
    lr: float = 1e-3
    weight_decay: float = 1e-4
    gamma: float = 0.9
    eval_batch_size: int = 64
    seed: int = 0


def flip_or_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The released basic augmentation on a uint8 HWC image."""
    if rng.uniform(0, 1) <= 0.5:
        return image
    if rng.integers(2) == 0:
        return np.ascontiguousarray(image[:, ::-1])
    noisy = image + rng.normal(0.0, math.sqrt(NOISE_VARIANCE), image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)  # truncates, as the released code


def to_input(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 HWC (C 1 or 3) -> normalised float CHW at size x size."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.BILINEAR))
    x = torch.from_numpy(resized.astype(np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def random_erasing(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomErasing.get_params + erase with value 0, drawing from `generator`."""
    if torch.rand(1, generator=generator).item() >= ERASE_P:
        return x
    _, height, width = x.shape
    area = height * width
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    for _ in range(10):
        erase_area = area * torch.empty(1).uniform_(*ERASE_SCALE, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        h, w = int(round(math.sqrt(erase_area * aspect))), int(round(math.sqrt(erase_area / aspect)))
        if not (h < height and w < width):
            continue
        top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
        left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
        x = x.clone()
        x[:, top:top + h, left:left + w] = 0
        return x
    return x


def load_backbone(model: TorchARMResNet18, state_dict: dict) -> None:
    """A torchvision resnet18 state dict into `model.features` (conv1 -> features.0, ..., layer4 -> features.7)."""
    names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    renamed = {f"{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in state_dict.items()
               if k.split(".")[0] in names}
    model.features.load_state_dict(renamed, strict=True)


def train_released_recipe(train_images: list[np.ndarray], train_labels: np.ndarray, val_images: list[np.ndarray],
                          val_labels: np.ndarray, num_classes: int, recipe: Recipe, *, backbone: dict | None = None,
                          on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train the released model with the released recipe; one record per epoch (as arm-jax's metrics.jsonl)."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    order_generator = torch.Generator().manual_seed(recipe.seed)
    erase_generator = torch.Generator().manual_seed(recipe.seed + 1)
    model = TorchARMResNet18(num_classes=num_classes, image_size=recipe.image_size, torchvision_init=True)
    if backbone is not None:
        load_backbone(model, backbone)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=recipe.gamma)
    loss_fn = nn.CrossEntropyLoss()
    labels = torch.as_tensor(np.asarray(train_labels, np.int64))
    records = []
    for epoch in range(recipe.epochs):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        order = torch.randperm(len(train_images), generator=order_generator)
        loss_sum, correct, count = 0.0, 0, 0
        for start in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):  # drop_last
            batch = order[start:start + recipe.batch_size]
            x = torch.stack([random_erasing(to_input(flip_or_noise(train_images[i], rng), recipe.image_size),
                                            erase_generator) for i in batch.tolist()])
            y = labels[batch]
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
        schedule.step()  # ExponentialLR, once per epoch
        seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_acc": correct / count,
                  "val_wa": validate(model, val_images, val_labels, recipe), "lr": lr, "time_s": seconds,
                  "images_per_s": count / seconds}
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return records


@torch.no_grad()
def validate(model: TorchARMResNet18, images: list[np.ndarray], labels: np.ndarray, recipe: Recipe) -> float:
    """Accuracy in eval mode with the batch GAR over shuffled batches of eval_batch_size."""
    model.eval()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    correct = 0
    for start in range(0, len(order), recipe.eval_batch_size):
        batch = order[start:start + recipe.eval_batch_size]
        x = torch.stack([to_input(images[i], recipe.image_size) for i in batch])
        correct += int((model(x).argmax(1).numpy() == np.asarray(labels)[batch]).sum())
    return correct / len(images)
