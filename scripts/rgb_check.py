"""train.py on RGB priors of public size: random UNets in the configs of google/ddpm-cifar10-32 and
google/ddpm-celebahq-256, saved locally (nothing is downloaded), a few training steps each.

    python scripts/rgb_check.py --device cuda --steps 20 --out rgb_check.json

For each config: the UNet (random weights, the published architecture) and a DDPM scheduler are saved as a
prior folder; a folder of smooth random RGB images stands in for the data (speed and memory do not depend
on what the pixels show); aps.training.train runs the shipped hybrid recipe (sr x4, 1 z x 1 ELBO draw,
forward KL 1, bf16) for --steps steps. Reported: parameters, steps/s after the first steps, peak GPU memory,
with and without the prior's gradient checkpointing, with the CUDA-graph step where it captures.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {  # the published UNet2DModel configs (diffusers' conversion of the DDPM checkpoints)
    "ddpm-cifar10-32": dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6, attention_head_dim=None),
    "ddpm-celebahq-256": dict(
        sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6, attention_head_dim=None),
}


def make_prior(name: str, folder: Path) -> int:
    from diffusers import DDPMScheduler, UNet2DModel

    from aps.priors.diffusers_prior import save_pipeline

    torch.manual_seed(0)
    unet = UNet2DModel(**CONFIGS[name])
    save_pipeline(unet, DDPMScheduler(num_train_timesteps=1000), folder)
    return sum(p.numel() for p in unet.parameters())


def make_images(folder: Path, size: int, n: int = 64) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        low = torch.rand(3, 8, 8, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(size, size), mode="bicubic", align_corners=False)[0]
        arr = (img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(folder / f"{i:03d}.png")


def run(name, prior_dir, data_dir, args, checkpointing: bool, graph: str, batch: int) -> dict:
    from aps.config import TrainConfig
    from aps.training import train

    times = []

    def tick(accelerator, model, step):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out = Path(tempfile.mkdtemp()) / "run"
    cfg = TrainConfig(prior=str(prior_dir), operator="sr", op_arg=["factor=4"], data=str(data_dir), out=str(out),
                      steps=args.steps, batch_size=batch, n_z=1, n_elbo=1, elbo_strata="batch", fkl_weight=1.0,
                      mixed_precision="bf16" if args.device.startswith("cuda") else "no", cpu=args.device == "cpu",
                      sample_every=0, log_every=10 ** 6, checkpoint_every=10 ** 6, cuda_graph=graph,
                      prior_gradient_checkpointing=checkpointing)
    row = {"config": name, "batch": batch, "gradient_checkpointing": checkpointing, "cuda_graph": graph}
    try:
        train(cfg, callback=tick)
        warm = times[5:]
        row["steps_per_s"] = (len(warm) - 1) / (warm[-1] - warm[0]) if len(warm) > 1 else None
        if args.device.startswith("cuda"):
            row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    except Exception as err:  # out of memory or a capture failure: reported, the other settings still run
        row["error"] = f"{type(err).__name__}: {err}"[:300]
        if args.device.startswith("cuda"):
            row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batch", type=int, default=0, help="measurements per step (default: 64 at 32x32, 4 at 256x256)")
    p.add_argument("--out", default="rgb_check.json")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            prior_dir, data_dir = Path(tmp) / name, Path(tmp) / f"{name}-images"
            n_params = make_prior(name, prior_dir)
            size = CONFIGS[name]["sample_size"]
            make_images(data_dir, size)
            batch = args.batch or (64 if size <= 64 else 4)
            settings = [(False, "auto"), (True, "auto"), (False, "off")]
            for checkpointing, graph in settings:
                row = run(name, prior_dir, data_dir, args, checkpointing, graph, batch)
                row["unet_parameters"] = n_params
                results.append(row)
                Path(args.out).write_text(json.dumps(results, indent=1))
    for r in results:
        print(f"{r['config']:18s} batch {r['batch']:3d} ckpt {str(r['gradient_checkpointing']):5s} graph {r['cuda_graph']:4s} "
              f"{(r.get('steps_per_s') or 0):6.2f} steps/s  peak {r.get('peak_gpu_gib', 0):6.2f} GiB  {r.get('error', '')}")


if __name__ == "__main__":
    main()
