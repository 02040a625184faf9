"""Gradient norms per level of the seed-0 10-digit pairs of both regimes (docs/results.md, "The
paper's regime"), at their trained weights: ``minifpn.analysis.gradient_norms`` over 20 batches of
8 training scenes. Run from the repository root after the pairs are trained:

    python docs/results/gradient_norms.py

It reads runs/k10_{scratch,paper}_s0/weights/ and writes docs/results/gradient_norms.json.
"""
import json
import time

from minifpn.analysis import gradient_norms
from minifpn.weights import load_reference


def main():
    out, start = {"command": "python docs/results/gradient_norms.py"}, time.perf_counter()
    for regime in ("scratch", "paper"):
        for name in ("fpn", "bottom_up"):
            detector = load_reference(name, folder=f"runs/k10_{regime}_s0/weights")
            out[f"{regime}/{name}"] = norms = gradient_norms(detector)
            print(f"{regime:>7} {name:>9}: dC " + ", ".join(f"{k} {v:.4f}" for k, v in norms["dC"].items())
                  + "; stage " + ", ".join(f"{k} {v:.4f}" for k, v in norms["stage"].items()))
    out["seconds"] = round(time.perf_counter() - start, 1)
    with open("docs/results/gradient_norms.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
