"""Benchmark workloads W1-W3: the data, the Flax model, the optimizer, and a PyTorch twin.

W1: MNIST-1D, MLP 40-256-256-10 ReLU, Adam 1e-3, batch 128, 20 epochs.
W2: MNIST-1D, the 1-D CNN (3 stride-2 convolutions of 32 channels, kernel 5), Adam 1e-3,
    batch 128, 10 epochs.
W3: 8x8 digits as images, the 2-D CNN (16 and 32 channels, kernel 3, stride 2, dense 64),
    SGD with momentum 0.9 (lr 0.05), batch 128, 20 epochs.
"""

from __future__ import annotations

import dataclasses

import optax

from jaxrepro import data, models


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    dataset: str  # "mnist1d" or "digits_images"
    epochs: int
    batch_size: int = 128

    def load(self):
        return data.load(self.dataset)

    def model(self):
        if self.name == "W1":
            return models.MLP(widths=(256, 256), num_classes=10, activation="relu")
        if self.name == "W2":
            return models.CNN1D(features=(32, 32, 32), kernel_size=5, num_classes=10)
        return models.CNN2D(features=(16, 32), kernel_size=3, dense=64, num_classes=10)

    def tx(self):
        if self.name == "W3":
            return optax.sgd(0.05, momentum=0.9)
        return optax.adam(1e-3)

    def torch_model(self):
        """The same architecture in PyTorch (same shapes and FLOPs; PyTorch's initialisers)."""
        from torch import nn

        if self.name == "W1":
            return nn.Sequential(
                nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
            )
        if self.name == "W2":
            layers, c = [nn.Unflatten(1, (1, 40))], 1
            for _ in range(3):
                layers += [nn.Conv1d(c, 32, 5, stride=2, padding=2), nn.ReLU()]
                c = 32
            return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 5, 10))
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def torch_optimizer(self, params):
        import torch

        if self.name == "W3":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)
        return torch.optim.Adam(params, lr=1e-3)

    def torch_input(self, x):
        """Our inputs are channels-last ([N, H, W, 1]); PyTorch wants [N, 1, H, W]."""
        return x.permute(0, 3, 1, 2) if x.ndim == 4 else x


WORKLOADS = {
    "W1": Workload("W1", "MNIST-1D MLP 40-256-256-10, Adam", "mnist1d", epochs=20),
    "W2": Workload("W2", "MNIST-1D CNN1D 3x32 k5, Adam", "mnist1d", epochs=10),
    "W3": Workload("W3", "digits 8x8 CNN2D 16-32 + 64, SGD momentum", "digits_images", epochs=20),
}
