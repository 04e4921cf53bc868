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


# --- a YOLO-style detector (YOLOv8 layout, small widths) --------------------------------------
class ConvBnSiLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class Bottleneck(nn.Module):
    """x + conv(conv(x)) (the residual only when shapes allow, as in YOLOv8)."""

    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2, self.add = ConvBnSiLU(c, c, 3), ConvBnSiLU(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Conv -> Split in two -> n bottlenecks on the second half -> Concat of all -> Conv."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBnSiLU(cin, 2 * self.c)
        self.cv2 = ConvBnSiLU((2 + n) * self.c, cout)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        import torch

        y = list(torch.split(self.cv1(x), [self.c, self.c], dim=1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 MaxPools, concatenated."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        hidden = cin // 2
        self.cv1, self.cv2 = ConvBnSiLU(cin, hidden), ConvBnSiLU(hidden * 4, cout)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        import torch

        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class YoloLike(nn.Module):
    """Backbone (strides 2-32, C2f stages, SPPF), FPN/PAN neck (Upsample + Concat) and three
    detection heads (box and class branches, concatenated per scale) as graph outputs."""

    def __init__(self, classes: int = 16, w: tuple = (16, 32, 64, 128, 256)):
        super().__init__()
        self.stem = ConvBnSiLU(3, w[0], 3, 2)
        self.b1 = nn.Sequential(ConvBnSiLU(w[0], w[1], 3, 2), C2f(w[1], w[1], 1))
        self.b2 = nn.Sequential(ConvBnSiLU(w[1], w[2], 3, 2), C2f(w[2], w[2], 2))  # P3
        self.b3 = nn.Sequential(ConvBnSiLU(w[2], w[3], 3, 2), C2f(w[3], w[3], 2))  # P4
        self.b4 = nn.Sequential(ConvBnSiLU(w[3], w[4], 3, 2), C2f(w[4], w[4], 1), SPPF(w[4], w[4]))  # P5
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n1 = C2f(w[4] + w[3], w[3], 1, shortcut=False)
        self.n2 = C2f(w[3] + w[2], w[2], 1, shortcut=False)
        self.d1, self.n3 = ConvBnSiLU(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3], 1, shortcut=False)
        self.d2, self.n4 = ConvBnSiLU(w[3], w[3], 3, 2), C2f(w[3] + w[4], w[4], 1, shortcut=False)

        def head(cin: int, cout: int) -> nn.Module:
            mid = max(cin // 4, 16)
            return nn.Sequential(ConvBnSiLU(cin, mid, 3), ConvBnSiLU(mid, mid, 3), nn.Conv2d(mid, cout, 1))

        self.box = nn.ModuleList(head(c, 64) for c in (w[2], w[3], w[4]))
        self.cls = nn.ModuleList(head(c, classes) for c in (w[2], w[3], w[4]))

    def forward(self, x):
        import torch

        p3 = self.b2(self.b1(self.stem(x)))
        p4 = self.b3(p3)
        p5 = self.b4(p4)
        t4 = self.n1(torch.cat([self.up(p5), p4], 1))
        o3 = self.n2(torch.cat([self.up(t4), p3], 1))
        o4 = self.n3(torch.cat([self.d1(o3), t4], 1))
        o5 = self.n4(torch.cat([self.d2(o4), p5], 1))
        return tuple(torch.cat([b(f), c(f)], 1) for f, b, c in zip((o3, o4, o5), self.box, self.cls))


def yolo_like(classes: int = 16) -> nn.Module:
    """A YOLOv8-style detector (Conv-BN-SiLU, C2f with Split/Concat and residual
    bottlenecks, SPPF, Upsample+Concat neck, three heads as outputs); input N x 3 x H x W
    with H, W multiples of 32."""
    return YoloLike(classes)
