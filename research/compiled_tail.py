"""A compiled BatchNorm -> dropout -> LeakyReLU tail against the engine's eager one: measured.

The lever of docs/performance.md ("Measured and dropped"): each block's elementwise tail, from
the convolution's output to the activation, as one ``torch.compile`` function (inductor,
training mode, static shapes, full graph); the convolutions stay eager on oneDNN. The dropout
mask is expanded inside the compiled function from the same 64-bit draws of torch's global
generator that ``fashionnet.model.keep_mask_half`` makes, so both variants train on the same
masks. Prints the one-time compile cost, the largest difference from the eager block (forward
and gradients), and the engine's training step against the tailed one, alternating, on the
real data at batch 64:

    OMP_WAIT_POLICY=PASSIVE python research/compiled_tail.py     # 1-2 minutes on 2 cores

Nothing in the product imports this file.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from fashionnet import download
from fashionnet.idx import RAW_FILES, load_raw
from fashionnet.model import FashionNet, _to_channels_last
from fashionnet.train import train_epoch

SLOPE = 0.1  # LeakyReLU's negative slope


def tail(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
         running_var: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """BatchNorm (training mode, running statistics updated), dropout, LeakyReLU of a
    ``channels_last`` (B, C, H, W) ``z``. ``words`` holds 64 random bits per 64 elements:
    element i in memory order is kept (times 2) iff bit i % 8 of byte i // 8 is set, the mask
    of ``keep_mask_half``."""
    y = F.batch_norm(z, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
    b, c, h, w = z.shape
    shifts = torch.arange(8, device=z.device, dtype=torch.int32)
    bits = (words.view(torch.uint8).to(torch.int32).unsqueeze(1) >> shifts) & 1  # (n/8, 8)
    keep = bits.view(-1)[: z.numel()].view(b, h, w, c).permute(0, 3, 1, 2)  # memory order
    return F.leaky_relu(y * (keep.to(z.dtype) * 2.0), SLOPE)


compiled_tail = torch.compile(tail, fullgraph=True, dynamic=False)


class TailedNet(FashionNet):
    """FashionNet whose training-mode blocks end in :func:`compiled_tail`."""

    def _block(self, z: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
        assert z.is_contiguous(memory_format=torch.channels_last)
        words = torch.empty((z.numel() + 63) // 64, dtype=torch.int64, device=z.device)
        words.random_(-(2**63), None)  # keep_mask_half's draw, from the global generator
        bn.num_batches_tracked.add_(1)
        return compiled_tail(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, words)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        x = self._block(self.conv1(x), self.bn1)  # (B, 24, 28, 28)
        x = self._block(self.conv2(x), self.bn2)  # (B, 64, 14, 14)
        if x.requires_grad:
            x.register_hook(_to_channels_last)
        return self.fc(x.flatten(1))


def start(cls: type[FashionNet]) -> tuple[FashionNet, torch.optim.Optimizer]:
    """The model and optimizer as ``train()`` sets them up, seed 0."""
    torch.manual_seed(0)
    model = cls().to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-5, amsgrad=True)


def errors(images: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Each float32 variant's error against the eager engine in float64 on one batch, same
    weights and masks: (largest |logit error|, largest gradient error relative to that
    parameter's largest gradient element). Conv biases are left out: BatchNorm follows them,
    so their gradient is zero in exact arithmetic and rounding noise in any float32 run."""
    x = images.unsqueeze(1).float().div_(255).contiguous(memory_format=torch.channels_last)
    results = {}
    for name, cls, dtype in (("float64", FashionNet, torch.float64),
                             ("eager", FashionNet, torch.float32),
                             ("tailed", TailedNet, torch.float32)):
        model, _ = start(cls)
        model.to(dtype)
        torch.manual_seed(1)  # the same masks for all
        logits = model(x.to(dtype))
        F.cross_entropy(logits, labels).backward()
        grads = {k: p.grad.double() for k, p in model.named_parameters() if k[:4] != "conv"
                 or k.endswith("weight")}
        results[name] = (logits.detach().double(), grads)
    exact_logits, exact_grads = results.pop("float64")
    return {name: (float((logits - exact_logits).abs().max()),
                   max(float((g - exact_grads[k]).abs().max() / exact_grads[k].abs().max())
                       for k, g in grads.items()))
            for name, (logits, grads) in results.items()}


def tail_times(eager: FashionNet, tailed: TailedNet, batch_size: int, pairs: int,
               dtype: torch.dtype, repeats: int = 20) -> tuple[list[float], list[float]]:
    """Seconds for both blocks' tails, forward and backward, eager and compiled, alternating."""
    torch.manual_seed(2)
    blocks = []
    for channels, side in ((24, 28), (64, 14)):
        z = torch.randn(batch_size, channels, side, side, dtype=dtype)  # a convolution's output
        z = z.to(memory_format=torch.channels_last)
        blocks.append((z.requires_grad_(), torch.randn_like(z)))
    drops = {id(eager.bn1): eager.drop1, id(eager.bn2): eager.drop2}

    def eager_tail(z: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
        return F.leaky_relu(drops[id(bn)](bn(z)), SLOPE, inplace=True)  # as FashionNet does

    times: dict[str, list[float]] = {"eager": [], "tailed": []}
    runs = {"eager": (eager_tail, (eager.bn1, eager.bn2)),
            "tailed": (tailed._block, (tailed.bn1, tailed.bn2))}
    for pair in range(pairs):
        for name in ("eager", "tailed") if pair % 2 == 0 else ("tailed", "eager"):
            block, norms = runs[name]
            began = time.perf_counter()
            for _ in range(repeats):
                for (z, grad), bn in zip(blocks, norms, strict=True):
                    block(z, bn).backward(grad)
            times[name].append((time.perf_counter() - began) / repeats)
    return times["eager"], times["tailed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=30, help="alternating timings per variant")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timing")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: under autocast, as train.precision bfloat16 runs")
    args = parser.parse_args()
    dtype = getattr(torch, args.precision)
    with tempfile.TemporaryDirectory() as scratch:
        for name in RAW_FILES:  # the four official files, verified, from Debian's package
            source = download.find_local(name, [Path("data/raw"), download.DEBIAN_DIR])
            download.install(Path(scratch), name, download.read_verified(source, name))
        train_set, _ = load_raw(Path(scratch))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, {args.precision}, "
          f"inductor cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}")
    b, n = args.batch_size, args.batch_size * args.steps
    images, labels = train_set.images[:n], train_set.labels[:n]

    tailed, tailed_opt = start(TailedNet)
    for shape, size in (("first batch", b), ("an epoch's last batch", 54_000 % b or b)):
        began = time.perf_counter()
        train_epoch(tailed, tailed_opt, images, labels, torch.arange(size), b, dtype=dtype)
        print(f"compile, {shape} ({size} images): {time.perf_counter() - began:.1f} s")
    for name, (logit_error, grad_error) in errors(images[:b], labels[:b]).items():  # float32
        print(f"{name} in float32 against the engine in float64, batch {b}, same masks: "
              f"logits {logit_error:.1e}, gradients {grad_error:.1e} of their largest element")

    eager, eager_opt = start(FashionNet)
    train_epoch(eager, eager_opt, images, labels, torch.arange(4 * b), b, dtype=dtype)  # warm-up
    variants = {"eager": (eager, eager_opt), "tailed": (tailed, tailed_opt)}
    wall: dict[str, list[float]] = {"eager": [], "tailed": []}
    cpu: dict[str, list[float]] = {"eager": [], "tailed": []}
    generator = torch.Generator().manual_seed(0)
    for pair in range(args.pairs):
        order = torch.randperm(n, generator=generator)
        for name in ("eager", "tailed") if pair % 2 == 0 else ("tailed", "eager"):
            began, began_cpu = time.perf_counter(), time.process_time()
            train_epoch(*variants[name], images, labels, order, b, dtype=dtype)
            wall[name].append(time.perf_counter() - began)
            cpu[name].append(time.process_time() - began_cpu)
    eager_tail, compiled = tail_times(eager, tailed, b, args.pairs, dtype)
    ratios = [e / t for e, t in zip(eager_tail, compiled, strict=True)]
    share = statistics.median(eager_tail) / (statistics.median(wall["eager"]) / args.steps)
    print(f"both tails, forward and backward, batch {b}: eager "
          f"{1e3 * statistics.median(eager_tail):.1f} ms ({share:.0%} of an eager step), "
          f"compiled {1e3 * statistics.median(compiled):.1f} ms; "
          f"speed-up median {statistics.median(ratios):.2f}, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}")
    print(f"{args.pairs} alternating pairs of {args.steps} steps at batch {b}:")
    for what, unit, times in (("wall", "img/s", wall), ("CPU", "img/CPU-s", cpu)):
        ratios = [e / t for e, t in zip(times["eager"], times["tailed"], strict=True)]
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        print(f"  {what:4s} eager {n / statistics.median(times['eager']):6.0f} {unit}, "
              f"tailed {n / statistics.median(times['tailed']):6.0f} {unit}; step speed-up "
              f"median {median:.3f}, quartiles {q1:.3f}-{q3:.3f}, "
              f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
