"""Score image posterior flows on held-out digits, and time their sampling.

    python scripts/image_benchmark.py checkpoints/mnist-denoise-flow checkpoints/mnist-sr-flow \
        --n-heldout 200 --n-samples 100 --device cuda --throughput 1000 10000 --out results.json

For each checkpoint: held-out digits 0..n-1 of its data set, measured with its operator (noise seeded
per digit, as `sample.py --heldout`), n posterior samples each; metrics from aps.evaluate_images.
Prints a Markdown table and writes everything to --out (JSON) and, optionally, a grid PNG per flow.
"""
import argparse
import json
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="flow folders written by train.py (image tasks)")
    p.add_argument("--n-heldout", type=int, default=200, help="held-out digits per operator (default: 200)")
    p.add_argument("--n-samples", type=int, default=100, help="posterior samples per digit (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="measurement and latent seed (default: 0)")
    p.add_argument("--heldout-data", help="score on the held-out images of this data set (mnist, digits8) instead "
                                          "of the checkpoint's own: needed for flows trained with --data prior")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--bf16", action="store_true", help="score with the flow under bf16 autocast")
    p.add_argument("--throughput", type=int, nargs="*", default=[], metavar="BATCH",
                   help="time flow passes of these batch sizes, fp32 and bf16 autocast (default: none)")
    p.add_argument("--out", default="image_benchmark.json", help="JSON results (default: image_benchmark.json)")
    p.add_argument("--grid-dir", help="write one PNG grid (8 digits) per flow here")
    p.add_argument("--judge", default=str(Path(__file__).resolve().parents[1] / "checkpoints" / "mnist-classifier-heldout"),
                   help="classifier flows: a second classifier folder (SmallCNN) that scores the samples' class "
                        "beside the operator's own (default: checkpoints/mnist-classifier-heldout; '' = none)")
    args = p.parse_args()

    from aps.cli import one_line_errors

    with one_line_errors("image_benchmark.py"):

        import torch

        import aps
        from aps.evaluate_images import score_posterior, summarize_scores, throughput
        from aps.image_grid import posterior_grid, save_png
        from aps.sampling import heldout_measurements

        results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                   "torch": torch.__version__, "n_heldout": args.n_heldout, "n_samples": args.n_samples,
                   "flows": {}}
        judge = None
        for ckpt in args.checkpoints:
            sampler = aps.load(ckpt, device=args.device)
            if args.judge and hasattr(sampler.operator, "n_classes") and judge is None:
                from aps.operators.classifier import load_classifier
                judge, judge_cfg = load_classifier(args.judge)
                judge = judge.to(args.device)
                results["judge"] = {"path": args.judge, "test_accuracy": judge_cfg.get("test_accuracy")}
            name = Path(ckpt).name
            y, x_true, _ = heldout_measurements(sampler, 0, args.n_heldout, seed=args.seed, data=args.heldout_data)
            t0 = time.perf_counter()
            scores = score_posterior(sampler, y, x_true, args.n_samples, seed=args.seed,
                                     autocast_dtype=torch.bfloat16 if args.bf16 else None, judge=judge)
            entry = {"operator": sampler.meta["task"]["operator"], "step": sampler.meta.get("step"),
                     "scoring_seconds": time.perf_counter() - t0, "metrics": summarize_scores(scores)}
            for batch in args.throughput:
                for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                    try:
                        entry.setdefault("throughput", []).append(
                            {"dtype": label, **throughput(sampler.flow, y[:1], batch, autocast_dtype=dtype)})
                    except torch.cuda.OutOfMemoryError:
                        entry.setdefault("throughput", []).append({"dtype": label, "batch": batch, "error": "OOM"})
                        torch.cuda.empty_cache()
            if args.grid_dir:
                x, _ = sampler.sample(y[:8], 16, seed=args.seed)
                save_png(posterior_grid(sampler.operator, y[:8], x, x_true[:8], n_show=8),
                         Path(args.grid_dir) / f"{name}.png")
            results["flows"][name] = entry
            print(json.dumps({name: entry}), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(markdown(results))


def markdown(results: dict) -> str:
    """The results as Markdown tables: quality per flow, then throughput."""
    keys = ["psnr_mean", "ssim_mean", "psnr_sample", "ssim_sample", "coverage90", "coverage90_dequantised",
            "coverage90_stroke", "coverage90_background", "coverage90_unobserved", "pixel_std", "class_accuracy",
            "judge_accuracy"]
    lines = ["| flow | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, e in results["flows"].items():
        m = e["metrics"]
        cells = [f"{m[k]['mean']:.3f} ± {m[k]['sem']:.3f}" if k in m else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = [(n, t) for n, e in results["flows"].items() for t in e.get("throughput", [])]
    if rows:
        lines += ["", "| flow | batch | dtype | ms per pass | samples/s |", "|---|---|---|---|---|"]
        for n, t in rows:
            if "error" in t:
                lines.append(f"| {n} | {t['batch']} | {t['dtype']} | {t['error']} | - |")
            else:
                lines.append(f"| {n} | {t['batch']} | {t['dtype']} | {1e3 * t['seconds_per_pass']:.1f} | "
                             f"{t['samples_per_s']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
