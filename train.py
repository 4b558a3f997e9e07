"""Train one amortized posterior flow for one problem (a mixture) or one image operator.

    accelerate launch train.py --mcgdiff 2,1,0 --out runs/d2          # one GPU, several, or CPU
    python train.py --problem my_problem.npz --steps 2000 --cpu
    python train.py --out runs/d2 --resume                             # continue a run
    accelerate launch train.py --prior checkpoints/mnist-prior --operator sr --op-arg factor=4 \
        --fkl-weight 1 --mixed-precision bf16 --max-seconds 600 --out runs/mnist-sr   # images: y made from MNIST train
    python train.py --prior checkpoints/mnist-prior --operator inpaint_box --op-arg box=[4,4,24,12] --dry-run
"""
import argparse

from aps.cli import one_line_errors
from aps.config import add_arguments, from_args


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    with one_line_errors("train.py"):
        from aps.training import dry_run, train

        cfg = from_args(args)
        if cfg.dry_run:
            print(dry_run(cfg))
            return
        out = train(cfg)
        print(f"saved the flow to {out}")


if __name__ == "__main__":
    main()
