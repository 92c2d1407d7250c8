"""The fast evaluation engine: FashionNet's eval-mode forward pass with BatchNorm folded, and
the batch loop that runs it over many images (shared by evaluation and prediction)."""

from __future__ import annotations

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


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one convolution that computes ``bn(conv(x))`` in eval mode:
    BatchNorm with running statistics is a per-channel affine map, folded into the filters."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = (conv.bias - bn.running_mean) * scale + bn.bias
    return weight.detach(), bias.detach()


def _onednn_conv_leaky_relu() -> Callable[..., torch.Tensor] | None:
    """oneDNN's convolution with a fused LeakyReLU (the kernel inductor emits), if this build
    of torch has it: it saves a pass over each activation."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise.default
    except (AttributeError, RuntimeError):
        return None


class InferenceNet:
    """FashionNet's eval-mode forward pass, for evaluation only: BatchNorm folded into the
    convolutions (eval-mode dropout is the identity), weights cast once to ``dtype``, and on
    CPU each convolution fused with its LeakyReLU by oneDNN. It computes what
    ``model.eval()(x)`` does, up to rounding; bfloat16 runs on AMX where the CPU has it.

    A snapshot: build a new one after the model's weights change.
    """

    def __init__(self, model: FashionNet, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        (w1, b1), (w2, b2) = (fold_batchnorm(model.conv1, model.bn1),
                              fold_batchnorm(model.conv2, model.bn2))
        cl = torch.channels_last
        self.w1, self.b1 = w1.to(dtype).contiguous(memory_format=cl), b1.to(dtype)
        self.w2, self.b2 = w2.to(dtype).contiguous(memory_format=cl), b2.to(dtype)
        fc = model.fc.weight.detach().to(dtype)
        self.fc_nchw, self.fc_bias = fc, model.fc.bias.detach().to(dtype)
        # The classifier's weight in (H, W, C) order, for channels_last activations, which
        # then flatten without a copy.
        self.fc_nhwc = fc.view(NUM_CLASSES, 64, 14, 14).permute(0, 2, 3, 1).reshape(
            NUM_CLASSES, -1).contiguous()
        self._fused = _onednn_conv_leaky_relu() if self.w1.device.type == "cpu" else None

    def _conv_leaky_relu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         stride: int) -> torch.Tensor:
        if self._fused is not None:
            return self._fused(x, weight, bias, [1, 1], [stride, stride], [1, 1], 1,
                               "leaky_relu", [0.1], "")
        return F.leaky_relu(F.conv2d(x, weight, bias, stride, 1), 0.1, inplace=True)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) float in [0, 1] -> (B, 10) logits in ``dtype``."""
        x = self._conv_leaky_relu(x.to(self.dtype), self.w1, self.b1, 1)
        x = self._conv_leaky_relu(x, self.w2, self.b2, 2)  # (B, 64, 14, 14)
        if x.is_contiguous(memory_format=torch.channels_last):
            return F.linear(x.permute(0, 2, 3, 1).flatten(1), self.fc_nhwc, self.fc_bias)
        return F.linear(x.flatten(1), self.fc_nchw, self.fc_bias)


def map_batches(model: nn.Module, images: torch.Tensor,
                step: Callable[[torch.Tensor, slice], T], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, batch_size: int = EVAL_BATCH) -> list[T]:
    """``step(logits, batch)`` for each batch of ``images`` (N, 28, 28) uint8, in order:
    ``batch`` is the slice of ``images`` it covers, ``logits`` (B, 10) on ``device``.

    The model runs in eval mode (BatchNorm running stats, no dropout) and its training mode is
    restored afterwards. A FashionNet runs as an :class:`InferenceNet` in ``dtype``; another
    module runs under autocast when ``dtype`` is bfloat16. ``step`` runs under the same
    inference mode and autocast as the forward pass.

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
        with torch.inference_mode(), autocast(device, dtype):
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
