"""Train one amortized posterior flow for one problem (a mixture) or one image operator.

    accelerate launch train.py --mcgdiff 2,1,0 --out runs/d2          # one GPU, several, or CPU
    accelerate launch train.py --recipe mnist-sr-flow --out runs/sr    # a shipped recipe (aps/recipes/*.toml)
    python train.py --recipe my_recipe.toml --lr 5e-4 --out runs/mine  # a recipe file, one option overridden
    python train.py --out runs/d2 --resume --steps 8000                # continue a run (as it was configured)
    python train.py --prior checkpoints/mnist-prior --operator inpaint_box --op-arg box=[4,4,24,12] --dry-run

Options are layered: defaults < recipe (--recipe, or the default recipe for the task's kind) < on --resume
the run's saved config < the options given here. --dry-run prints the result as a recipe, grouped by
section, and says where each value that is not a default came from.
"""
import argparse
import sys

from aps.cli import one_line_errors
from aps.config import add_arguments, explicit_args


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    given = explicit_args(parser, sys.argv[1:])
    with one_line_errors("train.py"):
        from aps.recipe import describe, resolve

        run = resolve(given)
        if run.cfg.dry_run:
            print(describe(run), end="")
            return
        from aps.training import train

        for note in run.notes:
            print(note, file=sys.stderr)
        out = train(run.cfg)
        print(f"saved the flow to {out}")


if __name__ == "__main__":
    main()
