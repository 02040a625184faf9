"""Gather the runs of the paper's-regime experiment (docs/results.md, "The paper's regime") into
the tables and the figure of that section. Run from the repository root after the runs:

    python docs/results/make_regime_map.py

It reads runs/{paper,scratch}_{plain,distractors10}_s{0,1,2}/seed*/SETTING/metrics.json (Table 1's
RPN runs), runs/k10_{scratch,paper}_s{0,1,2}/weights/reference.json (the 10-digit pairs) and, if
present, runs/paper_deep_plain_s*/ (two blocks per stage), and writes into docs/results/:
table1_{paper,scratch}_{plain,distractors10}.{json,md}, table1_paper_deep_plain.{json,md},
regime_map.{json,md} and regime_map.png.
"""
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")

from minifpn import table1  # noqa: E402

OUT = os.path.join("docs", "results")
MAP_SETTINGS = ("fpn", "bottom_up", "p2_only")  # (c), (d), (f): the regime map's rows


def rpn_runs(name: str) -> dict:
    return table1.collect_summaries(sorted(glob.glob(f"runs/{name}_s*/seed*/*/metrics.json")))


def only(runs: dict, settings) -> dict:
    return {seed: [s for s in summaries if s["setting"] in settings] for seed, summaries in runs.items()}


def k10_runs(regime: str) -> dict:
    runs = {}
    for path in sorted(glob.glob(f"runs/k10_{regime}_s*/weights/reference.json")):
        with open(path) as f:
            info = json.load(f)
        runs[info["seed"]] = table1.summaries_from_reference(info)
    return dict(sorted(runs.items()))


def main():
    rpn = {}
    for scenes, config in (("plain", {}), ("distractors10", {"distractors": 10})):
        rpn[scenes] = {}
        for regime in ("scratch", "paper"):
            runs = rpn_runs(f"{regime}_{scenes}")
            if not runs:
                sys.exit(f"no runs for {regime}_{scenes}")
            for seed, summaries in runs.items():
                assert all(table1.regime_of(s["detector_config"]) == regime for s in summaries), seed
            table1.write_over_seeds(runs, OUT, config, f"table1_{regime}_{scenes}")
            rpn[scenes][regime] = only(runs, MAP_SETTINGS)
    deep = rpn_runs("paper_deep_plain")
    if deep:
        table1.write_over_seeds(deep, OUT, {}, "table1_paper_deep_plain")
    k10 = {regime: k10_runs(regime) for regime in ("scratch", "paper")}
    data = table1.regime_map(rpn, k10)
    with open(os.path.join(OUT, "regime_map.json"), "w") as f:
        json.dump(data, f, indent=1)
    text = table1.markdown_regime_map(data)
    with open(os.path.join(OUT, "regime_map.md"), "w") as f:
        f.write(text + "\n")
    table1.plot_regime_map(data).savefig(os.path.join(OUT, "regime_map.png"), dpi=100)
    print(text)


if __name__ == "__main__":
    main()
