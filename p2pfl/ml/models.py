"""The models: small ``nn.Module`` classes, pure torch (no torch_geometric).

- :class:`MLP` for the 8x8 digits (64 inputs, 10 classes).
- :class:`LogisticRegression`, a one-layer model small enough for 1000-node simulations.
- :class:`SmallCNN`, the CNN of the orchestration study for 3x32x32 images.
- :class:`STGCN`, the spatio-temporal graph network of the traffic study (Yu et al., IJCAI 2018).

STGCN takes the graph as a forward argument, never as a buffer, and normalizes over channels only,
so ``state_dict()`` has the same keys and shapes for every sensor graph: cloudlets that own
different sensors can average their models.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MLP", "STGCN", "LogisticRegression", "STGCNConfig", "SmallCNN", "parameter_count"]


def parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not), the figure the tests pin."""
    return sum(p.numel() for p in model.parameters())


class MLP(nn.Module):
    """Fully connected classifier: inputs -> hidden... -> classes, ReLU between layers."""

    def __init__(
        self, inputs: int = 64, hidden: tuple[int, ...] = (128, 64), classes: int = 10
    ) -> None:
        super().__init__()
        sizes = [inputs, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # type: ignore[no-any-return]


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer (650 parameters for digits)."""

    def __init__(self, inputs: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))  # type: ignore[no-any-return]


class SmallCNN(nn.Module):
    """conv(6, k5) ReLU maxpool2 -> conv(16, k5) ReLU maxpool2 -> 120 -> 84 -> classes.

    For 3x32x32 images (62,006 parameters with 10 classes).
    """

    def __init__(self, in_channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class STGCNConfig:
    """STGCN of the traffic study: 2 ST-blocks with channels 64-16-64, Kt=3, Chebyshev K=3."""

    in_channels: int = 1
    n_his: int = 12  # input steps (5 minutes each)
    horizons: tuple[int, ...] = (3, 6, 12)  # steps ahead: 15, 30, 60 minutes
    kt: int = 3  # temporal kernel
    ks: int = 3  # Chebyshev polynomial order K (reaches K-1 = 2 hops)
    channels: tuple[int, int, int] = (64, 16, 64)
    blocks: int = 2
    dropout: float = 0.5


class TemporalGLU(nn.Module):
    """Gated temporal convolution: (P + residual) * sigmoid(Q), length shrinks by kt - 1.

    Works on [batch, channels, time, nodes].
    """

    def __init__(self, c_in: int, c_out: int, kt: int) -> None:
        super().__init__()
        self.kt = kt
        self.c_out = c_out
        self.conv = nn.Conv2d(c_in, 2 * c_out, (kt, 1))
        # Residual path: 1x1 conv when shrinking channels, zero-padding when growing.
        self.align = nn.Conv2d(c_in, c_out, 1) if c_in > c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.align is not None:
            residual = self.align(x)
        elif x.shape[1] < self.c_out:
            pad = x.new_zeros(x.shape[0], self.c_out - x.shape[1], *x.shape[2:])
            residual = torch.cat([x, pad], dim=1)
        else:
            residual = x
        p, q = self.conv(x).chunk(2, dim=1)
        out: torch.Tensor = (p + residual[:, :, self.kt - 1 :, :]) * torch.sigmoid(q)
        return out


class ChebGraphConv(nn.Module):
    """Chebyshev graph convolution of order K over the scaled Laplacian given at call time."""

    def __init__(self, c_in: int, c_out: int, k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, c_in, c_out))
        self.bias = nn.Parameter(torch.zeros(c_out))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # [B, T, N, C]: matmul with [N, N] mixes nodes
        terms = [x]
        if self.weight.shape[0] > 1:
            terms.append(laplacian @ x)
        for _ in range(2, self.weight.shape[0]):
            terms.append(2 * (laplacian @ terms[-1]) - terms[-2])
        out = sum(t @ w for t, w in zip(terms, self.weight, strict=True)) + self.bias
        assert isinstance(out, torch.Tensor)
        return out.permute(0, 3, 1, 2)


class STBlock(nn.Module):
    """Temporal GLU -> Chebyshev graph conv + ReLU -> temporal GLU -> LayerNorm(C) -> dropout."""

    def __init__(self, c_in: int, channels: tuple[int, int, int], config: STGCNConfig) -> None:
        super().__init__()
        c_t, c_s, c_o = channels
        self.temporal1 = TemporalGLU(c_in, c_t, config.kt)
        self.spatial = ChebGraphConv(c_t, c_s, config.ks)
        self.temporal2 = TemporalGLU(c_s, c_o, config.kt)
        self.norm = nn.LayerNorm(c_o)  # channels only: shapes independent of the sensor count
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        x = self.temporal1(x)
        x = torch.relu(self.spatial(x, laplacian))
        x = self.temporal2(x)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.dropout(x)  # type: ignore[no-any-return]


class STGCN(nn.Module):
    """Spatio-temporal graph convolutional network.

    ``forward(x, laplacian)``: x is [batch, n_his, nodes, in_channels] (z-scored speeds), the
    laplacian is the [nodes, nodes] scaled Laplacian 2L/lambda_max - I of the graph the batch lives
    on; the output is [batch, len(horizons), nodes] in the same z-units as the input.
    """

    def __init__(self, config: STGCNConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or STGCNConfig()
        blocks = []
        c_in = config.in_channels
        for _ in range(config.blocks):
            blocks.append(STBlock(c_in, config.channels, config))
            c_in = config.channels[2]
        self.blocks = nn.ModuleList(blocks)
        t_left = config.n_his - 2 * config.blocks * (config.kt - 1)
        if t_left < 1:
            raise ValueError(f"n_his={config.n_his} is too short for {config.blocks} blocks")
        # Output layer: a temporal GLU over what is left of the window, then per node an MLP.
        self.out_temporal = TemporalGLU(c_in, c_in, t_left)
        self.out_norm = nn.LayerNorm(c_in)
        self.out_hidden = nn.Linear(c_in, c_in)
        self.out_head = nn.Linear(c_in, len(config.horizons))

    def forward(self, x: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # [B, C, T, N]
        for block in self.blocks:
            x = block(x, laplacian)
        x = self.out_temporal(x)[:, :, 0, :].transpose(1, 2)  # [B, N, C]
        x = torch.relu(self.out_hidden(self.out_norm(x)))
        return self.out_head(x).transpose(1, 2)  # type: ignore[no-any-return]
