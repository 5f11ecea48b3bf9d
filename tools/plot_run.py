"""Plot a run into RUN_DIR/run.png (see atesd_mc.plotting).

    python tools/plot_run.py RUN_DIR [--output PNG]"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--output", default="")
    args = p.parse_args(argv)
    from atesd_mc.plotting import plot

    out = plot(args.run_dir, args.output or os.path.join(args.run_dir, "run.png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
