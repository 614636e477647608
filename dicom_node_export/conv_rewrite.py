"""Export-time rewrite of 3-D convolutions as 2-D convolutions (same outputs, faster onnxruntime CPU).

onnxruntime's CPU `Conv` runs 3-D kernels through a generic im2col path, while 2-D kernels get
its blocked NCHWc kernels. A Conv3d with kernel (kt, kh, kw), stride (st, sh, sw), padding
(pt, ph, pw) and dilation (dt, dh, dw) equals a Conv2d over the temporal taps stacked as
channels: pad the input in time by pt, take for each tap d the frames
`x[:, :, d*dt :: st]` (T_out of them), fold time into the batch ((B*T_out, C, H, W)) and
stack the kt taps along the channel axis ((B*T_out, kt*C, H, W)); the Conv2d weight is
`W.permute(0, 2, 1, 3, 4).reshape(O, kt*C, kh, kw)`. For kt == 1 (the 1x1x1 shortcuts) that is a
plain Conv2d on every output frame.

Modes (all exact): "gather" (default) picks all (frame, tap) pairs with ONE Gather on the
time axis of the (B, T, C, H, W) view, which is already the stacked layout; "concat" slices
each tap and concatenates (one more copy); "sum" adds kt Conv2d outputs, one per tap. onnxruntime
profile, paper-size stage 1, batch 2, 2 loaded cores: gather 1.73 s, concat 1.81 s, sum 1.83 s,
plain Conv3d 1.87 s per run (Conv alone 1.38 s vs 1.84 s; the rest is Gather/Pad/NCHWc reorders).

`fold_batchnorm` folds an eval-mode BatchNorm3d that directly follows a Conv3d in an
`nn.Sequential` into that conv's weight and bias, so the rewritten graph has no BN between the
Conv2d and its layout ops. `rewrite_conv3d` returns a deep copy with both done; the original
model is untouched.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Conv3dAs2d", "fold_batchnorm", "rewrite_conv3d", "REWRITE_MODES"]

REWRITE_MODES = ("gather", "concat", "sum")


def _triple(v: int | str | tuple[int, ...]) -> tuple[int, int, int]:
    """A Conv3d's stride / padding / dilation as three ints (torch keeps 3-tuples; str padding is refused before)."""
    return cast(tuple[int, int, int], tuple(v) if isinstance(v, (tuple, list)) else (v, v, v))


class Conv3dAs2d(nn.Module):
    """A Conv3d computed with Conv2d: (B, C, T, H, W) -> (B, O, T_out, H_out, W_out), same numbers."""

    def __init__(self, conv: nn.Conv3d, mode: str = "gather") -> None:
        super().__init__()
        if mode not in REWRITE_MODES:
            raise ValueError(f"Conv3dAs2d: mode '{mode}' is not one of {REWRITE_MODES}")
        if conv.groups != 1:
            raise ValueError(f"Conv3dAs2d: groups={conv.groups} is not supported; only groups=1 convolutions are rewritten")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"Conv3dAs2d: padding {conv.padding!r} / padding_mode '{conv.padding_mode}' is not supported; "
                             "use explicit integer zero padding")
        out_c, in_c, kt, kh, kw = conv.weight.shape
        (st, sh, sw), (pt, ph, pw), (dt, dh, dw) = _triple(conv.stride), _triple(conv.padding), _triple(conv.dilation)
        self.mode, self.in_channels, self.out_channels = mode, in_c, out_c
        self.kt, self.st, self.pt, self.dt = kt, st, pt, dt
        w = conv.weight.detach()
        convs: list[nn.Conv2d]
        if mode in ("gather", "concat"):
            w2 = w.permute(0, 2, 1, 3, 4).reshape(out_c, kt * in_c, kh, kw)  # channel index = tap * C + c
            convs = [nn.Conv2d(kt * in_c, out_c, (kh, kw), (sh, sw), (ph, pw), (dh, dw), bias=conv.bias is not None)]
            convs[0].weight.data.copy_(w2)
        else:
            convs = [nn.Conv2d(in_c, out_c, (kh, kw), (sh, sw), (ph, pw), (dh, dw),
                               bias=conv.bias is not None and d == 0) for d in range(kt)]
            for d, c in enumerate(convs):
                c.weight.data.copy_(w[:, :, d])
        if conv.bias is not None:
            cast(Tensor, convs[0].bias).data.copy_(conv.bias.detach())  # made with a bias just above
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> Tensor:
        # int(): under ONNX tracing the sizes become constants (the graph's only dynamic axis is the
        # batch, folded in with -1), which spares onnxruntime a Shape/Gather/Concat chain per reshape
        c, t, h, w = (int(v) for v in x.shape[1:])
        if self.pt:
            x = F.pad(x, (0, 0, 0, 0, self.pt, self.pt))
        t_out = (t + 2 * self.pt - self.dt * (self.kt - 1) - 1) // self.st + 1
        x = x.transpose(1, 2)  # (B, T, C, H, W): frames become batch items after the reshape
        if self.mode == "gather":
            # one Gather picks every (output frame, tap) pair: (B, T_out * kt, C, H, W), already in the
            # (B*T_out, kt*C) order the Conv2d weight expects, so the reshape is free
            idx = torch.tensor([to * self.st + d * self.dt for to in range(t_out) for d in range(self.kt)],
                               dtype=torch.long, device=x.device)
            picked = x if self.kt == 1 and self.st == 1 else x.index_select(1, idx)
            y = self.convs[0](picked.reshape(-1, self.kt * c, h, w))
            return self._untime(y, t_out)
        span = self.st * (t_out - 1) + 1
        taps = [x[:, d * self.dt: d * self.dt + span: self.st] for d in range(self.kt)]  # each (B, T_out, C, H, W)
        if self.mode == "concat":
            stacked = taps[0] if self.kt == 1 else torch.cat(taps, dim=2)
            y = self.convs[0](stacked.reshape(-1, self.kt * c, h, w))
        else:
            y = self.convs[0](taps[0].reshape(-1, c, h, w))
            for d in range(1, self.kt):
                y = y + self.convs[d](taps[d].reshape(-1, c, h, w))
        return self._untime(y, t_out)

    def _untime(self, y: Tensor, t_out: int) -> Tensor:
        y = y.reshape(-1, t_out, self.out_channels, int(y.shape[2]), int(y.shape[3]))
        return y.transpose(1, 2)  # (B, O, T_out, H_out, W_out)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kt={self.kt}, st={self.st}, pt={self.pt}, mode={self.mode}"


def _fold(conv: nn.Conv3d, bn: nn.BatchNorm3d) -> nn.Conv3d:
    # an affine BatchNorm with running statistics (fold_batchnorm checks the statistics)
    weight, shift = cast(Tensor, bn.weight), cast(Tensor, bn.bias)
    mean, var = cast(Tensor, bn.running_mean), cast(Tensor, bn.running_var)
    scale = weight.detach() / torch.sqrt(var.detach() + bn.eps)
    folded = copy.deepcopy(conv)
    folded.weight.data = conv.weight.detach() * scale.reshape(-1, 1, 1, 1, 1)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(mean)
    folded.bias = nn.Parameter((bias - mean.detach()) * scale + shift.detach())
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm3d that follows a Conv3d inside an nn.Sequential (in place)."""
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d) and not bn.training \
                    and bn.track_running_stats and bn.running_mean is not None:
                module._modules[a] = _fold(conv, bn)
                module._modules[b] = nn.Identity()
    return model


def _replace(module: nn.Module, mode: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Conv3d):
            setattr(module, name, Conv3dAs2d(child, mode))
        else:
            _replace(child, mode)


def rewrite_conv3d(model: nn.Module, *, mode: str = "gather", fold_bn: bool = True) -> nn.Module:
    """Deep copy of `model` (in eval mode) with every Conv3d replaced by `Conv3dAs2d`."""
    if mode not in REWRITE_MODES:
        raise ValueError(f"rewrite_conv3d: mode '{mode}' is not one of {REWRITE_MODES}")
    out = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(out)
    _replace(out, mode)
    return out
