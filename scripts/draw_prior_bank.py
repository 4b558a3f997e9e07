"""Draw (or top up) the bank of prior images that `train.py --data prior` trains on, and time it.

    python scripts/draw_prior_bank.py --prior checkpoints/mnist-prior --n 20000 --sampler ddim --steps 100 \
        --batch 2000 --device cuda

The bank lands in the same cache, under the same key, as train.py's (same --prior-cache), so a later
`train.py --data prior` with these settings reads it instead of drawing. Prints the seconds spent, the images
drawn and the cache file; --grid writes a PNG of the first 64 images.
"""
import argparse
import json
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True, help="a diffusers prior folder (unet/ + scheduler/)")
    p.add_argument("--n", type=int, default=20000, help="images in the bank (default: 20000)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"), help="the prior's scheduler (default: ddim)")
    p.add_argument("--steps", type=int, default=100, help="inference steps (default: 100)")
    p.add_argument("--batch", type=int, default=500, help="images per batch on the device (default: 500)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--cache", default="", help="cache folder (default: train.py's, ~/.cache/aps/prior-banks)")
    p.add_argument("--grid", help="write the first 64 images as one PNG here")
    args = p.parse_args()

    from aps.cli import one_line_errors

    with one_line_errors("draw_prior_bank.py"):
        import torch

        from aps.prior_bank import default_cache, prior_bank, read_bank, to_float
        from aps.priors import DiffusersPrior

        prior = DiffusersPrior.from_pretrained(args.prior).to(args.device)
        cache = Path(args.cache) if args.cache else default_cache()
        t0 = time.perf_counter()
        images, info = prior_bank(prior, args.n, sampler=args.sampler, steps=args.steps, batch=args.batch,
                                  device=args.device, cache_dir=cache)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        path = cache / f"{info['key']}.safetensors"
        stored = read_bank(path, info["key"], prior.event_shape)
        print(json.dumps({**info, "seconds": round(seconds, 2), "file": str(path),
                          "stored": 0 if stored is None else len(stored), "device": args.device}))
        if args.grid:
            from aps.image_grid import save_png

            x = to_float(images[:64])
            k = int(len(x) ** 0.5)
            tiles = x[: k * k].reshape(k, k, *x.shape[1:]).permute(0, 3, 1, 4, 2)  # (k, H, k, W, C)
            grid = ((tiles.reshape(k * x.shape[2], k * x.shape[3], -1) + 1) * 127.5).round().clamp(0, 255)
            save_png(grid.squeeze(-1).to(torch.uint8).numpy(), args.grid)


if __name__ == "__main__":
    main()
