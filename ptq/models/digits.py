"""A small classifier for quantization exercises: an MLP on scikit-learn's bundled handwritten digits (offline).

The data are the 1,797 8×8 images of ``sklearn.datasets.load_digits`` (UCI optical digits, Alpaydin & Kaynak
1998; shipped inside scikit-learn, no download), pixels 0..16 scaled to [0, 1]. A seeded permutation splits them
70 / 30 into training and test images. The model, 64 → 256 → 256 → 10 with ReLU, trains in seconds with Adam and
is scored by test accuracy and cross-entropy.

For the block engine (``ptq.calibrate``) the whole MLP is one block: ``DigitsMLP.layers`` is a ModuleList holding
it, and ``MAPPING`` lists its linears. fc1 reads pixels (nothing before it can absorb a scale); fc2 and fc3 read
ReLU(previous linear), and ReLU(x / s) = ReLU(x) / s for s > 0, so a rescaler may fold 1/s into the rows of the
linear before them (as for OPT's fc1 → fc2).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ptq.models.mappings import Group, Mapping

TEST_FRACTION = 0.3
PIXEL_MAX = 16.0

MAPPING = Mapping(
    blocks="layers",
    groups=(
        Group(None, ("fc1",), "fc1"),
        Group("fc1", ("fc2",), "fc2", "linear"),
        Group("fc2", ("fc3",), "fc3", "linear"),
    ),
)


@dataclass(frozen=True)
class DigitsSplit:
    train_x: torch.Tensor  # float32 [n_train, 64] in [0, 1]
    train_y: torch.Tensor  # int64 [n_train]
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_split(seed: int = 0, test_fraction: float = TEST_FRACTION) -> DigitsSplit:
    """The digits, shuffled with ``seed`` and split into training and test images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / PIXEL_MAX
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = round(len(x) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return DigitsSplit(x[train], y[train], x[test], y[test])


class MLPBlock(nn.Module):
    """fc3(ReLU(fc2(ReLU(fc1(x)))))."""

    def __init__(self, features: int, hidden: tuple[int, int], classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DigitsMLP(nn.Module):
    """The MLP as a one-block model: ``layers[0]`` is the block; ``forward`` returns the class logits.

    ``config`` and ``use_cache`` are the two things the calibration engine expects of a language model (it turns
    the KV cache off); they mean nothing here.
    """

    def __init__(self, features: int = 64, hidden: tuple[int, int] = (256, 256), classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MLPBlock(features, hidden, classes)])
        self.config = SimpleNamespace(model_type="digits_mlp", use_cache=False)

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return self.layers[0](x)


def train_mlp(split: DigitsSplit, seed: int = 0, epochs: int = 25, batch_size: int = 64, lr: float = 3e-3,
              hidden: tuple[int, int] = (256, 256)) -> DigitsMLP:
    """Adam on the cross-entropy of the training images, seeded (same seed, same weights on one machine)."""
    torch.manual_seed(seed)
    model = DigitsMLP(split.train_x.shape[1], hidden, int(split.train_y.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(split.train_x), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(split.train_x[batch]), split.train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classification_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
                           device: str | torch.device = "cpu") -> dict[str, float]:
    """``accuracy``: fraction of ``x``'s images whose arg-max logit is the label ``y``; ``nll``: mean cross-entropy
    of the labels in nats, which moves with every logit while accuracy only moves when an arg-max flips (on 539
    test images one flip is 0.19 points)."""
    correct, nll = 0, 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        logits = model(xb.to(device)).float().cpu()
        correct += int((logits.argmax(dim=-1) == yb).sum())
        nll += float(F.cross_entropy(logits, yb, reduction="sum"))
    return {"accuracy": correct / len(y), "nll": nll / len(y)}
