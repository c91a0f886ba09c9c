"""The released code's model in PyTorch: torchvision's resnet18 layout and `ResNet18_ARM___RAF`'s head.

Written from the facts in shared/REFERENCE.md (torchvision is not importable beside the CPU torch
build these machines use); none of the authors' code is copied. The parity tests and
`scripts/compare_training.py` build their PyTorch models from here. PyTorch is an optional
dependency (`pip install 'arm-jax[torch]'`): nothing in arm_jax imports this module at import
time, and importing it without PyTorch raises ModuleNotFoundError saying what to install.
"""

try:
    import torch
    from torch import nn
except ModuleNotFoundError as err:  # PyTorch is optional
    raise ModuleNotFoundError("arm_jax.interop.torch_reference needs PyTorch: pip install 'arm-jax[torch]' "
                              "(or torch==2.13.0, the CPU build)", name="torch") from err


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TorchResNet18(nn.Module):
    """torchvision's resnet18: same module names, so the same state-dict keys."""

    def __init__(self, num_classes: int = 1000, torchvision_init: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, in_planes = (64, 128, 256, 512), 64
        for index, planes in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        # torchvision_init: torchvision's initialisation (the released code trains from
        # torchvision's resnet18, as a from-scratch recipe run must): Kaiming normal (fan-out)
        # convolutions and unit BatchNorm; nn.Conv2d's own default is a uniform about 2.4x
        # narrower. The parity tests keep the default: their bounds were set on its scale.
        for module in self.modules() if torchvision_init else ():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TorchARM(nn.Module):
    """The released code's head: PixelShuffle(16), one shared 1-channel conv, BN(2), affinity."""

    def __init__(self, kernel: int = 32, stride: int = 8):
        super().__init__()
        self.arrange = nn.PixelShuffle(16)
        self.de_albino = nn.Conv2d(1, 1, kernel, stride, 0, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.alpha = nn.Parameter(torch.tensor([1.0]))

    def forward(self, x):
        x = self.arrange(x)
        # The same kernel on each arranged channel separately.
        x = torch.cat([self.de_albino(x[:, c : c + 1]) for c in range(x.shape[1])], dim=1)
        x = self.bn(x)
        global_mean = x.mean(dim=[0, 1])
        return x.mean(dim=1, keepdim=True) + self.alpha * global_mean


class TorchARMResNet18(nn.Module):
    """`ResNet18_ARM___RAF`: `features` = resnet18 children minus avgpool/fc, then `arm`, then `fc`."""

    def __init__(self, num_classes: int = 7, image_size: int = 224, torchvision_init: bool = False):
        super().__init__()
        resnet = TorchResNet18(torchvision_init=torchvision_init)
        self.features = nn.Sequential(*list(resnet.children())[:-2])
        self.arm = TorchARM()
        side = 16 * -(-image_size // 32)
        out = (side - 32) // 8 + 1
        self.fc = nn.Linear(out * out, num_classes)

    def forward(self, x):
        x = self.arm(self.features(x))
        return self.fc(torch.flatten(x, 1))


def randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial affine weights and running statistics."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def randomised_arm(seed: int = 0, *, image_size: int = 224, num_classes: int = 7) -> TorchARMResNet18:
    """An authors'-layout ARM model with seeded weights and randomised BatchNorm, in eval mode."""
    torch.manual_seed(seed)
    model = TorchARMResNet18(num_classes=num_classes, image_size=image_size)
    randomise_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


def randomised_resnet(seed: int = 0, *, num_classes: int = 1000) -> TorchResNet18:
    """torchvision's resnet18 layout with seeded weights and randomised BatchNorm, in eval mode."""
    torch.manual_seed(seed)
    model = TorchResNet18(num_classes=num_classes)
    randomise_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()
