"""PyTorch architecture builders for the zoo: small, fast versions of the classic classifiers.

Every builder takes `in_channels`, `image_size`, `num_classes` and returns an `nn.Module` in eval mode.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _dense_stack(in_features: int, hidden: tuple[int, ...], num_classes: int) -> nn.Module:
    """Flatten, then a ReLU layer per `hidden` width, then the output layer (one Sequential, so weights keep
    the same names whatever the depth)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for out in hidden:
        layers += [nn.Linear(width, out), nn.ReLU()]
        width = out
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def mlp(in_channels: int = 1, image_size: int = 28, num_classes: int = 10, hidden: int = 128) -> nn.Module:
    """Two hidden ReLU layers on the flattened image."""
    return _dense_stack(in_channels * image_size**2, (hidden, hidden // 2), num_classes)


def mlp_deep(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Module:
    """Three hidden ReLU layers (256, 128, 64) on the flattened image: a deeper MLP than `mlp`."""
    return _dense_stack(in_channels * image_size**2, (256, 128, 64), num_classes)


def lenet5(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Module:
    """LeNet-5: two conv + max-pool stages and three dense layers."""
    side = ((image_size - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))


def vgg11(in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 16) -> nn.Module:
    """VGG-11 layout (8 conv layers with BatchNorm, 5 pools), channels scaled by `width`/64."""
    plan = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            side = -(-side // 2)
        else:
            out = width * item
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
    layers += [nn.Flatten(), nn.Linear(channels * side * side, 4 * width), nn.ReLU(), nn.Dropout(0.1),
               nn.Linear(4 * width, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and an identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant (3x3 stem, no stem pool), base width `width` (64 in the paper)."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        blocks, cin = [], width
        for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for index in range(2):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18(in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 16) -> nn.Module:
    """ResNet-18 (CIFAR variant)."""
    return ResNet18(in_channels, image_size, num_classes, width)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, ReLU6, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


def mobilenetv2_small(in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> nn.Module:
    """A small MobileNetV2: depthwise/grouped convs, ReLU6 (exported as Clip), inverted residuals."""
    plan = [(16, 1, 1), (24, 2, 4), (24, 1, 4), (32, 2, 4), (32, 1, 4), (64, 2, 4)]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()]
    cin = 16
    for cout, stride, expand in plan:
        layers.append(InvertedResidual(cin, cout, stride, expand))
        cin = cout
    layers += [nn.Conv2d(cin, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(128, num_classes)]
    return nn.Sequential(*layers)


class DenseLayer(nn.Module):
    """DenseNet layer: BN-ReLU-1x1-BN-ReLU-3x3, output concatenated to its input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(),
                                  nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def densenet_small(in_channels: int = 3, image_size: int = 32, num_classes: int = 10, growth: int = 8) -> nn.Module:
    """A small DenseNet: three dense blocks of 3 layers with transitions (Concat, AveragePool)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 2 * growth, 3, padding=1, bias=False)]
    channels = 2 * growth
    for block in range(3):
        for _ in range(3):
            layers.append(DenseLayer(channels, growth))
            channels += growth
        if block < 2:
            out = channels // 2
            layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, out, 1, bias=False),
                       nn.AvgPool2d(2)]
            channels = out
    layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


class EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block with hand-written multi-head attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / (dim // self.heads) ** 0.5, dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + self.proj(mixed)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer: patch embedding conv, class token, learned positions, encoder blocks."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, patch: int = 4,
                 dim: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit_small(in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> nn.Module:
    """A small ViT (2 blocks, 4 heads, dim 64)."""
    return ViT(in_channels, image_size, num_classes)


class RowLSTM(nn.Module):
    """Reads the image row by row (channels side by side) with an LSTM; its last hidden state goes through a
    ReLU dense layer to the classes. Exports as an ONNX LSTM node."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, hidden: int = 64):
        super().__init__()
        self.recurrent = nn.LSTM(in_channels * image_size, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.permute(0, 2, 1, 3).flatten(2)  # [batch, rows, channels * columns]
        out, _ = self.recurrent(rows)
        return self.head(out[:, -1])


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "lstm": RowLSTM,
    "mlp": mlp, "mlp_deep": mlp_deep, "lenet5": lenet5, "vgg11": vgg11, "resnet18": resnet18,
    "mobilenetv2": mobilenetv2_small, "densenet": densenet_small, "vit": vit_small,
}


def build(name: str, in_channels: int, image_size: int, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """Build architecture `name` with a seeded initialisation, in eval mode."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    torch.manual_seed(seed)
    return ARCHITECTURES[name](in_channels=in_channels, image_size=image_size, num_classes=num_classes).eval()
