"""ResNet-18 and MobileNetV2 shapes in plain torch (no torchvision), for latency and
structure benchmarks: latency does not depend on trained weights."""

from __future__ import annotations

from torch import nn


class Residual(nn.Module):
    """act(body(x) + shortcut(x)); shortcut and act default to identity."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None, act: nn.Module | None = None):
        super().__init__()
        self.body, self.shortcut, self.act = body, shortcut or nn.Identity(), act or nn.Identity()

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


def resnet18() -> nn.Module:
    """ResNet-18: basic blocks [2, 2, 2, 2], widths 64-512, 1000 classes."""
    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return Residual(
            nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
            ),
            None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)),
            nn.ReLU(),
        )

    widths = [64, 128, 256, 512]
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, w in enumerate(widths):
        layers += [block(cin, w, 1 if i == 0 else 2), block(w, w, 1)]
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000))


def mobilenet_v2() -> nn.Module:
    """MobileNetV2 (width 1.0): inverted residuals with ReLU6, 1000 classes."""
    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> list:
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return layers + [nn.ReLU6()] if act else layers

    def inverted(cin: int, cout: int, stride: int, expand: int) -> nn.Module:
        hidden = cin * expand
        layers = conv_bn(cin, hidden, 1, 1) if expand != 1 else []
        layers += conv_bn(hidden, hidden, 3, stride, groups=hidden) + conv_bn(hidden, cout, 1, 1, act=False)
        body = nn.Sequential(*layers)
        return Residual(body) if stride == 1 and cin == cout else body

    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers, cin = conv_bn(3, 32, 3, 2), 32
    for expand, cout, repeats, stride in settings:
        for i in range(repeats):
            layers.append(inverted(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers += conv_bn(cin, 1280, 1, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, 1000))
