"""Shi et al. 2020 stage II: bidirectional Conv-LSTM over the stage-I feature maps of a study's slabs.

Input: (B, T, C, h, w), the layer4 activations of the frozen stage-I network for the T = 50 slabs of a study
(512 x 24 x 24 each at 384 px). ``units`` (2 in the paper) units, each an ascending Conv-LSTM (slab 0 -> T-1)
then a descending one (T-1 -> 0) over the ascending one's outputs, ``filters`` (96) 3 x 3 filters, batch
norm after each Conv-LSTM, channel dropout (``input_dropout``, 0.2) on the inputs and recurrent states,
then 2 x 2 max-pooling (stride 2) per slab. The last unit's outputs are averaged over the slabs, flattened,
dropout 0.5, one linear output: the PE-present logit (B,) (sigmoid + BCE in training).

The recurrence is a plain Python loop over T, so ``torch.onnx.export`` unrolls it into a fixed-length graph
(the node always feeds T slabs); dropout is off in eval mode and batch norm uses its running statistics,
so the exported graph is the eval-mode network exactly.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

__all__ = ["ConvLSTMCell", "ConvLSTMNet", "conv_lstm_net"]


class ConvLSTMCell(nn.Module):
    """One Conv-LSTM step (Xingjian et al. 2015, without peepholes): gates from a 3 x 3 conv of [x, h]."""

    def __init__(self, in_channels: int, filters: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.filters = filters
        self.conv = nn.Conv2d(in_channels + filters, 4 * filters, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        i, f, g, o = torch.chunk(self.conv(torch.cat([x, h], dim=1)), 4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class _Direction(nn.Module):
    """A Conv-LSTM run over the slabs in one direction, channel dropout on inputs and states, then batch norm."""

    def __init__(self, in_channels: int, filters: int, reverse: bool, dropout: float) -> None:
        super().__init__()
        self.cell = ConvLSTMCell(in_channels, filters)
        self.reverse = reverse
        self.drop_x = nn.Dropout2d(dropout)
        self.drop_h = nn.Dropout2d(dropout)
        self.bn = nn.BatchNorm2d(filters)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _, hh, ww = x.shape
        h = x.new_zeros(b, self.cell.filters, hh, ww)
        c = torch.zeros_like(h)
        outs: list[Tensor] = [h] * t
        order = range(t - 1, -1, -1) if self.reverse else range(t)
        for k in order:
            h, c = self.cell(self.drop_x(x[:, k]), self.drop_h(h), c)
            outs[k] = h
        y = torch.stack(outs, dim=1)
        return cast(Tensor, self.bn(y.flatten(0, 1))).reshape(b, t, -1, hh, ww)


class ConvLSTMNet(nn.Module):
    """The stage-II network (module docstring); ``in_hw`` is the (h, w) of the stage-I maps."""

    def __init__(self, in_channels: int, in_hw: tuple[int, int], filters: int = 96, units: int = 2,
                 input_dropout: float = 0.2, dropout: float = 0.5) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        ch, (hh, ww) = in_channels, in_hw
        for _ in range(units):
            blocks += [_Direction(ch, filters, reverse=False, dropout=input_dropout),
                       _Direction(filters, filters, reverse=True, dropout=input_dropout)]
            ch, hh, ww = filters, hh // 2, ww // 2
        if hh < 1 or ww < 1:
            raise ValueError(f"conv_lstm_net: {units} units of 2 x 2 pooling leave no cells of a {in_hw} map; "
                             "use fewer units or a larger crop")
        self.units = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(filters * hh * ww, 1)
        self.in_channels, self.in_hw = in_channels, in_hw

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C, h, w) feature maps -> (B,) PE-present logit."""
        for i in range(0, len(self.units), 2):
            x = self.units[i + 1](self.units[i](x))
            b, t = x.shape[:2]
            x = self.pool(x.flatten(0, 1))
            x = x.reshape(b, t, *x.shape[1:])
        z = self.dropout(x.mean(dim=1).flatten(1))
        return cast(Tensor, self.fc(z))[:, 0]


def conv_lstm_net(in_channels: int, in_hw: tuple[int, int], filters: int = 96, units: int = 2,
                  input_dropout: float = 0.2, dropout: float = 0.5) -> ConvLSTMNet:
    """Build the stage-II network (96 filters, 2 units, dropout 0.2 / 0.5 in the paper)."""
    return ConvLSTMNet(in_channels, in_hw, filters=filters, units=units, input_dropout=input_dropout, dropout=dropout)
