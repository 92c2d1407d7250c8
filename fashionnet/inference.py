"""The fast evaluation engine: FashionNet's eval-mode forward pass with BatchNorm folded, and
the batch loop that runs it over many images (shared by evaluation and prediction)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from fashionnet.data import NUM_CLASSES, to_input
from fashionnet.model import FashionNet
from fashionnet.runtime import autocast, retain_freed_memory

EVAL_BATCH = 256  # images per forward pass: small batches stay in cache (fastest on CPU)

T = TypeVar("T")
# (x, weight, bias, stride) -> LeakyReLU(conv(x)), padding 1
ConvLeakyReLU = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one convolution that computes ``bn(conv(x))`` in eval mode:
    BatchNorm with running statistics is a per-channel affine map, folded into the filters."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = (conv.bias - bn.running_mean) * scale + bn.bias
    return weight.detach(), bias.detach()


def _plain_conv_leaky_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           stride: int) -> torch.Tensor:
    return F.leaky_relu(F.conv2d(x, weight, bias, stride, 1), 0.1, inplace=True)


def _fused_conv_leaky_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           stride: int) -> torch.Tensor:
    # oneDNN's convolution with a fused LeakyReLU, the kernel inductor emits: a private op
    # (torch.ops.mkldnn), so only used after _onednn_conv_leaky_relu's probe has run it.
    return torch.ops.mkldnn._convolution_pointwise.default(
        x, weight, bias, [1, 1], [stride, stride], [1, 1], 1, "leaky_relu", [0.1], "")


@functools.cache
def _onednn_conv_leaky_relu(dtype: torch.dtype = torch.float32) -> ConvLeakyReLU | None:
    """The fused oneDNN kernel for ``dtype`` on CPU, if this build of torch runs it and it
    computes what the plain ops do: it saves a pass over each activation. The op is private,
    so it is probed once on a tiny input; any error (missing op, changed signature or
    semantics, a dtype the build lacks) falls back to the plain ops."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(2, 3, 6, 6, generator=generator).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(4, 3, 3, 3, generator=generator) / 4).to(dtype)
        weight = weight.contiguous(memory_format=torch.channels_last)
        bias = torch.randn(4, generator=generator).to(dtype)
        with torch.inference_mode():
            fused = _fused_conv_leaky_relu(x, weight, bias, 2)
            plain = _plain_conv_leaky_relu(x, weight, bias, 2)
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        if fused.shape != plain.shape or fused.dtype != dtype or not torch.allclose(
                fused.float(), plain.float(), rtol=tolerance, atol=tolerance):
            return None
    except Exception:  # a private op: whatever way it fails, the plain ops do the same work
        return None
    return _fused_conv_leaky_relu


class InferenceNet:
    """FashionNet's eval-mode forward pass, for evaluation only: BatchNorm folded into the
    convolutions (eval-mode dropout is the identity), the convolutions' weights cast once to
    ``dtype``, and on CPU each convolution fused with its LeakyReLU by oneDNN. It computes
    what ``model.eval()(x)`` does, up to rounding; bfloat16 runs on AMX where the CPU has it.

    The classifier always computes in float32, and so do the logits: in bfloat16, logits of
    8-16 would round to steps of 1/16, and argmax would break the resulting ties toward the
    lower class. It is about 4% of the pass's multiply-adds, but with AMX computing the
    convolutions, 15% of bfloat16 evaluation's time (docs/performance.md).

    A snapshot: build a new one after the model's weights change.
    """

    def __init__(self, model: FashionNet, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        (w1, b1), (w2, b2) = (fold_batchnorm(model.conv1, model.bn1),
                              fold_batchnorm(model.conv2, model.bn2))
        cl = torch.channels_last
        self.w1, self.b1 = w1.to(dtype).contiguous(memory_format=cl), b1.to(dtype)
        self.w2, self.b2 = w2.to(dtype).contiguous(memory_format=cl), b2.to(dtype)
        fc = model.fc.weight.detach().float()
        self.fc_nchw, self.fc_bias = fc, model.fc.bias.detach().float()
        # The classifier's weight in (H, W, C) order, for channels_last activations, which
        # then flatten without a copy.
        self.fc_nhwc = fc.view(NUM_CLASSES, 64, 14, 14).permute(0, 2, 3, 1).reshape(
            NUM_CLASSES, -1).contiguous()
        fused = _onednn_conv_leaky_relu(dtype) if self.w1.device.type == "cpu" else None
        self._conv_leaky_relu: ConvLeakyReLU = fused or _plain_conv_leaky_relu
        self.fused = fused is not None

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) float in [0, 1] -> (B, 10) float32 logits."""
        x = self._conv_leaky_relu(x.to(self.dtype), self.w1, self.b1, 1)
        x = self._conv_leaky_relu(x, self.w2, self.b2, 2)  # (B, 64, 14, 14)
        if x.is_contiguous(memory_format=torch.channels_last):
            x, fc = x.permute(0, 2, 3, 1).flatten(1), self.fc_nhwc
        else:
            x, fc = x.flatten(1), self.fc_nchw
        # As (10, K) @ (K, B): float32's kernel for that shape is faster than for
        # (B, K) @ (K, 10) (0.85x against 0.75x of the bfloat16 logits' speed, per CPU-second).
        # Outside any caller's autocast, which would compute it in bfloat16 again.
        with torch.autocast(x.device.type, enabled=False):
            return torch.addmm(self.fc_bias.unsqueeze(1), fc, x.float().t()).t()  # (B, 10)


def map_batches(model: nn.Module, images: torch.Tensor,
                step: Callable[[torch.Tensor, slice], T], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, batch_size: int = EVAL_BATCH) -> list[T]:
    """``step(logits, batch)`` for each batch of ``images`` (N, 28, 28) uint8, in order:
    ``batch`` is the slice of ``images`` it covers, ``logits`` (B, 10) on ``device``.

    The model runs in eval mode (BatchNorm running stats, no dropout) and its training mode is
    restored afterwards. A FashionNet runs as an :class:`InferenceNet` in ``dtype``, its logits
    float32; another module runs under autocast when ``dtype`` is bfloat16. ``step`` runs under
    the same inference mode and autocast as the forward pass.

    On a CPU with several torch threads, batches run side by side, one thread each: a batch's
    activations then stay in one core's cache, which is about 1.2x the throughput of sharing
    every convolution between the cores. Each batch is computed the same way either way.
    """
    retain_freed_memory()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    forward = InferenceNet(model, dtype) if isinstance(model, FashionNet) else model

    def one_batch(start: int) -> T:
        batch = slice(start, start + batch_size)
        # inference_mode and autocast are per thread: set here, in the thread that runs it.
        # InferenceNet casts its own weights; autocast is for another module.
        with torch.inference_mode(), autocast(device, dtype if forward is model else
                                              torch.float32):
            # uint8 crosses to the device, a quarter of the bytes; it is scaled there.
            return step(forward(to_input(images[batch].to(device))), batch)

    starts = range(0, len(images), batch_size)
    threads = torch.get_num_threads()
    try:
        if device.type == "cpu" and threads > 1 and len(starts) > 1:
            torch.set_num_threads(1)  # inherited by the workers' threads
            try:
                with ThreadPoolExecutor(threads, thread_name_prefix="evaluate") as pool:
                    return list(pool.map(one_batch, starts))  # in order
            finally:
                torch.set_num_threads(threads)
        return [one_batch(start) for start in starts]
    finally:
        model.train(was_training)
