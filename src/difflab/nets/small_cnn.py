"""A small CNN classifier of clean images: the judge of class-conditional samples and the features of
the fast "classifier FID" (``difflab.evaluate.classifier``)."""

from __future__ import annotations

import torch
from torch import nn

from difflab.nets import register

FEATURE_DIM = 128


@register("small_cnn")
class SmallCNN(nn.Module):
    """Three stride-2 conv blocks (5x5 conv to 32 channels, 3x3 to 64, 3x3 to 128; batch norm,
    ReLU), a 4x4 adaptive average pool, then 2048 -> 128 (the penultimate features) -> classes.

    Strided convolutions instead of max pooling keep it cheap on a CPU (about 2.5 M multiply-adds
    per 28x28 image). Works on any image size; inputs are floats in [-1, 1]
    (see ``difflab.data.ImageData.to_model``). ``config`` holds the JSON-serialisable constructor arguments.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        self.config = {"kind": "small_cnn", "in_channels": int(in_channels),
                       "num_classes": int(num_classes), "image_size": [int(s) for s in image_size]}

        def block(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2, bias=False),
                    nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(*block(in_channels, 32, 5), *block(32, 64, 3), *block(64, 128, 3),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.penultimate_layer = nn.Sequential(nn.Linear(128 * 16, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, 128] of float images [B, C, H, W] in [-1, 1]."""
        return self.penultimate_layer(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.penultimate(x))
