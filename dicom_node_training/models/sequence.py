"""Phase-2 sequence model: TCN (or bidirectional GRU) + window head + nine attention heads.

Input: window features ``x`` (B, L, F) (L = 40 in the paper) and ``mask`` (B, L) (1 valid,
0 padding; padding is at the end, see :mod:`dicom_node.model.sequence`). Inside the model each step
gets its neighbour differences ``x_prev - x`` and ``x_next - x`` concatenated (3F = 1536 for
F = 512); a difference is zero at the sequence edges and where the neighbour (or the step
itself) is padding. Then a TCN (Bai et al. 2018 residual blocks) or a bidirectional GRU
encodes the sequence to ``hidden`` channels; padded steps are set to zero after every block,
so valid outputs do not depend on how much padding follows.

TCN padding: we use NON-CAUSAL 'same' padding (``d*(k-1)/2`` on both sides) by default, because
a CT sequence has no time direction and a window's neighbours on both sides matter; the paper's
causal variant (padding ``(k-1)*d`` then chomp) is available with ``causal=True``.

Heads: a per-step linear window head, and nine attention heads in ``STUDY_LABELS`` order:
``a = softmax(tanh(X w_q))`` over valid steps, ``e = a X``, then a 2-layer MLP -> one logit.

Outputs (:class:`SequenceOutput`): window logits (B, L), study logits (B, 9), attention (B, 9, L).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from dicom_node.labels import STUDY_LABELS
from dicom_node.model.sequence import SEQUENCE_LENGTH, FixedLength, from_fixed_length, to_fixed_length

__all__ = [
    "SequenceOutput",
    "TemporalBlock",
    "SequenceModel",
    "sequence_model",
    "neighbour_differences",
    "fold_weight_norm",
    "SEQUENCE_LENGTH",
    "FixedLength",
    "to_fixed_length",
    "from_fixed_length",
]

_MASK_FILL = -1.0e4  # tanh scores are in [-1, 1]; exp(-1e4) underflows to 0 in float32


class SequenceOutput(NamedTuple):
    window_logits: Tensor  # (B, L)
    study_logits: Tensor  # (B, 9) in STUDY_LABELS order
    attention: Tensor  # (B, 9, L); sums to 1 over valid steps, 0 on padding


def neighbour_differences(x: Tensor, mask: Tensor) -> Tensor:
    """(B, L, F), (B, L) -> (B, L, 3F) = [x, x_prev - x, x_next - x], zero where undefined."""
    m = mask.unsqueeze(-1)
    x = x * m
    zero_x = torch.zeros_like(x[:, :1])
    zero_m = torch.zeros_like(m[:, :1])
    x_prev = torch.cat([zero_x, x[:, :-1]], dim=1)
    m_prev = torch.cat([zero_m, m[:, :-1]], dim=1)
    x_next = torch.cat([x[:, 1:], zero_x], dim=1)
    m_next = torch.cat([m[:, 1:], zero_m], dim=1)
    return torch.cat([x, (x_prev - x) * m_prev * m, (x_next - x) * m_next * m], dim=-1)


class TemporalBlock(nn.Module):
    """Residual block of Bai et al.: 2 x (dilated conv, weight norm, ReLU, dropout) + shortcut."""

    def __init__(self, n_in: int, n_out: int, kernel_size: int, dilation: int, dropout: float, causal: bool) -> None:
        super().__init__()
        if not causal and (kernel_size - 1) * dilation % 2:
            raise ValueError(f"TemporalBlock: non-causal 'same' padding needs an odd kernel, got kernel_size={kernel_size}")
        total = (kernel_size - 1) * dilation
        self.pad = (total, 0) if causal else (total // 2, total // 2)
        self.conv1 = weight_norm(nn.Conv1d(n_in, n_out, kernel_size, dilation=dilation))
        self.conv2 = weight_norm(nn.Conv1d(n_out, n_out, kernel_size, dilation=dilation))
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.parametrizations.weight.original1, 0.0, 0.01)
        if self.downsample is not None:
            nn.init.normal_(self.downsample.weight, 0.0, 0.01)

    def forward(self, x: Tensor, m: Tensor) -> Tensor:
        """``x`` (B, C, L), ``m`` (B, 1, L)."""
        out = self.dropout(self.relu(self.conv1(nn.functional.pad(x, self.pad))))
        out = self.dropout(self.relu(self.conv2(nn.functional.pad(out * m, self.pad))))
        res = x if self.downsample is None else self.downsample(x)
        return self.relu(out + res) * m


class _TCN(nn.Module):
    def __init__(self, n_in: int, hidden: int, levels: int, kernel_size: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TemporalBlock(n_in if i == 0 else hidden, hidden, kernel_size, 2**i, dropout, causal) for i in range(levels)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(1)
        h = x.transpose(1, 2) * m
        for block in self.blocks:
            h = block(h, m)
        return h.transpose(1, 2)


class _BiGRU(nn.Module):
    """Bidirectional GRU; ``hidden // 2`` units per direction so the output has ``hidden`` channels.

    Padding is not packed (keeps ONNX export simple): the backward direction reads the zero
    padding before the last valid step. Outputs on padded steps are zeroed.
    """

    def __init__(self, n_in: int, hidden: int, levels: int, dropout: float) -> None:
        super().__init__()
        if hidden % 2:
            raise ValueError(f"GRU encoder: hidden must be even (two directions), got {hidden}")
        self.gru = nn.GRU(n_in, hidden // 2, num_layers=levels, batch_first=True, bidirectional=True,
                          dropout=dropout if levels > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out, _ = self.gru(x * mask.unsqueeze(-1))
        return self.dropout(out) * mask.unsqueeze(-1)


class SequenceModel(nn.Module):
    def __init__(
        self,
        kind: Literal["tcn", "gru"] = "tcn",
        in_features: int = 512,
        hidden: int = 128,
        levels: int = 2,
        kernel_size: int = 3,
        dropout: float = 0.2,
        mlp_hidden: int | None = None,
        causal: bool = False,
        num_study_labels: int = len(STUDY_LABELS),
    ) -> None:
        super().__init__()
        n_in = 3 * in_features
        if kind == "tcn":
            self.encoder: nn.Module = _TCN(n_in, hidden, levels, kernel_size, dropout, causal)
        elif kind == "gru":
            self.encoder = _BiGRU(n_in, hidden, levels, dropout)
        else:
            raise ValueError(f"sequence_model: kind must be 'tcn' or 'gru', got {kind!r}")
        self.kind = kind
        self.in_features = in_features
        self.hidden = hidden
        mlp_hidden = mlp_hidden or hidden
        self.window_head = nn.Linear(hidden, 1)
        self.queries = nn.Parameter(torch.randn(num_study_labels, hidden) * hidden**-0.5)
        self.study_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(mlp_hidden, 1))
            for _ in range(num_study_labels)
        )

    def forward(self, x: Tensor, mask: Tensor) -> SequenceOutput:
        """``x`` (B, L, F) features, ``mask`` (B, L) with 1 on valid steps (float or bool)."""
        mask = mask.to(x.dtype)
        h = self.encoder(neighbour_differences(x, mask), mask)  # (B, L, hidden)
        window_logits = self.window_head(h).squeeze(-1)
        scores = torch.tanh(torch.einsum("bld,kd->bkl", h, self.queries))  # (B, 9, L)
        valid = mask.unsqueeze(1)
        scores = scores * valid + _MASK_FILL * (1.0 - valid)
        attention = torch.softmax(scores, dim=-1) * valid
        attention = attention / attention.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        embeddings = torch.einsum("bkl,bld->bkd", attention, h)  # (B, 9, hidden)
        study_logits = torch.cat([head(embeddings[:, k]) for k, head in enumerate(self.study_heads)], dim=-1)
        return SequenceOutput(window_logits=window_logits, study_logits=study_logits, attention=attention)


def sequence_model(
    kind: Literal["tcn", "gru"] = "tcn",
    in_features: int = 512,
    hidden: int = 128,
    levels: int = 2,
    kernel_size: int = 3,
    dropout: float = 0.2,
    causal: bool = False,
) -> SequenceModel:
    """The phase-2 model of Ma et al. 2022 (defaults = paper: TCN, 2 levels, kernel 3, 128 channels, dropout 0.2)."""
    return SequenceModel(kind=kind, in_features=in_features, hidden=hidden, levels=levels,
                         kernel_size=kernel_size, dropout=dropout, causal=causal)


def fold_weight_norm(model: nn.Module) -> nn.Module:
    """Replace every weight-norm parametrization by its current plain weight, in place (for export)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model
