"""The ``minifpn`` command. Run ``minifpn --help`` for the list of jobs."""
from __future__ import annotations

import argparse
import sys
import time


def cmd_gradcheck(args) -> int:
    from .backend import get_backend
    from .gradcheck import format_table, standard_checks

    get_backend(args.backend)  # a clear error now if the backend cannot be used
    start = time.perf_counter()
    results = standard_checks(backend=args.backend, seed=args.seed)
    print(f"Gradient checks in float64 on {args.backend}: central differences (h = 1e-5) "
          f"against each hand-written backward,\nwith a random upstream gradient; "
          f"an entry passes below a max relative error of 1e-6.\n")
    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} of {len(results)} passed "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minifpn",
        description="Feature Pyramid Networks from scratch in NumPy: every backward by hand.")
    jobs = parser.add_subparsers(dest="job", metavar="JOB")
    jobs.required = True
    p = jobs.add_parser(
        "gradcheck", help="gradient-check every op and layer and print a table",
        description="Check every hand-written backward pass (conv2d, max_pool2d, "
                    "upsample_nearest, batch_norm, relu, add and the layers built on them) "
                    "against central-difference numerical gradients in float64, and print "
                    "one line per check: op, shape, max relative error, pass/fail. "
                    "Exits with status 1 if any check fails.")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"],
                   help="array backend to run on (default: numpy)")
    p.add_argument("--seed", type=int, default=0, help="seed for inputs and upstream gradients")
    p.set_defaults(run=cmd_gradcheck)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
