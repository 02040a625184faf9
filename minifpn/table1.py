"""The paper's Table 1 (Lin et al. 2017, Sec. 5.1): which feature maps should the RPN look at?

Everything about that experiment lives here, in one place:

- ``SETTINGS``, ``LETTERS``, ``resolve``: the six rows (a)-(f), defined in
  ``minifpn.models.settings`` with the models that build them, and named here too;
- ``PAPER_AR1K``, ``PAPER_AR100``: the paper's numbers; ``PAPER_RPN``: how it trains the RPNs;
- ``run_ablation``: train every setting at one budget, evaluate each, and write table1.json and
  table1.md (the ``minifpn ablation`` command only parses its options and calls it);
- ``markdown_table``: our numbers beside the paper's;
- ``run_over_seeds``: ``run_ablation`` once per seed; ``aggregate`` (mean and standard deviation
  of each metric over the seeds), ``beyond_spread`` (which differences exceed the spread) and
  ``markdown_table_over_seeds`` make its table1_seeds.{json,md} (``write_over_seeds``);
  ``collect_summaries`` gathers runs made by separate commands into the same form.

How a setting is wired (which maps the head sees, which FPN variant) is up to
``minifpn.models.detector.Detector`` and ``minifpn.models.fpn.FPN``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics

from .models.detector import Detector
from .models.settings import CHOICES, LETTERS, SETTINGS, Setting, resolve
from .parallel import world
from .train import train_and_evaluate

# The settings themselves live with the models that build them (minifpn.models.settings).
# The paper's Table 1 (RPN proposals of ResNet-50 on COCO minival), in %. PAPER_AR1K: average
# recall with 1000 proposals per image, overall and for small, medium and large objects
# (AR^1k, AR^1k_s, AR^1k_m, AR^1k_l); PAPER_AR100: its AR^100 column, with 100 proposals.
PAPER_AR1K = {
    "c4": (48.3, 32.0, 58.7, 62.2), "c5": (44.9, 25.3, 55.5, 64.2),
    "fpn": (56.3, 44.9, 63.4, 66.2), "bottom_up": (49.5, 30.5, 59.9, 68.0),
    "no_lateral": (46.1, 26.5, 57.4, 64.7), "p2_only": (51.3, 35.1, 59.7, 67.6),
}
PAPER_AR100 = {"c4": 36.1, "c5": 36.3, "fpn": 44.0, "bottom_up": 37.4, "no_lateral": 34.5, "p2_only": 38.4}

# How the paper trains the RPNs of Table 1 (Sec. 4.1, 5.1): one class, "object"; an anchor is
# positive at IoU >= 0.7 with a box and negative below 0.3 with every box; 256 anchors sampled per
# image. DetectorConfig fields: the defaults of `minifpn ablation`.
PAPER_RPN = {"num_classes": 1, "positive_iou": 0.7, "negative_iou": 0.3, "anchors_per_image": 256}
ITERATIONS = 600  # training steps per setting of `minifpn ablation` (the run in docs/results.md)

# our columns: metrics keys of minifpn.detection.metrics.evaluate, as table headings
OUR_COLUMNS = {"AR@100": "AR@100", "AR_small": "AR_s", "AR_medium": "AR_m", "AR_large": "AR_l",
               "AP": "AP", "AP50": "AP50"}
PAPER_COLUMNS = ("paper AR^100", "paper AR^1k", "paper AR^1k_s", "paper AR^1k_m", "paper AR^1k_l")


def markdown_table(summaries: list) -> str:
    """A markdown table of our runs beside the paper's Table 1, one row per summary (as
    ``minifpn.train.train_and_evaluate`` returns it: "setting" and "metrics" are read), in %.

    Ours keep at most 100 detections per 128-px scene of at most 5 digits; we set them beside the
    paper's AR^1k (1000 proposals per COCO image of about 7 objects), and show its AR^100 too."""
    headings = ["setting", *OUR_COLUMNS.values(), *PAPER_COLUMNS]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for summary in summaries:
        name, metrics = summary["setting"], summary["metrics"]
        ours = [f"{100 * metrics[key]:.1f}" for key in OUR_COLUMNS]
        paper = [f"{v:.1f}" for v in (PAPER_AR100[name], *PAPER_AR1K[name])]
        lines.append("| " + " | ".join([SETTINGS[name].label, *ours, *paper]) + " |")
    return "\n".join(lines)


def run_ablation(settings, detector_config, train_config, out_dir: str, eval_scenes: int,
                 backend: str = "numpy", progress: bool = True, time_limit: float | None = None,
                 log=print, report=None) -> list:
    """Train each of ``settings`` (names or letters) with the same ``train_config``, evaluate each
    on ``eval_scenes`` test scenes, and write ``out_dir``/table1.json (the summaries) and
    ``out_dir``/table1.md (``markdown_table``). Returns the summaries, in the order given.

    ``detector_config`` (a DetectorConfig) is copied with each setting in turn, so every row has
    the same backbone, width, anchors and seed; the paper's Table 1 is an RPN, ``num_classes=1``.
    Setting s trains in ``out_dir``/s (checkpoint.npz, metrics.json). ``time_limit`` (seconds)
    applies to each setting. ``log`` gets the progress lines; ``report``, if given, is called with
    each summary as soon as its setting is done (the CLI prints the metrics there)."""
    summaries = []
    for name in [resolve(s) for s in settings]:  # a bad name fails before any training
        log(f"\n=== {SETTINGS[name].label} ===")
        detector = Detector(dataclasses.replace(detector_config, setting=name)).to(backend)
        summary, _, _, _ = train_and_evaluate(detector, train_config, os.path.join(out_dir, name),
                                              eval_scenes, progress=progress, time_limit=time_limit)
        summaries.append(summary)
        if report is not None:
            report(summary)
    table, out = markdown_table(summaries), os.path.join(out_dir, "table1.md")
    if world().rank == 0:  # with --workers, every rank trained the same rows; rank 0 writes them
        with open(os.path.join(out_dir, "table1.json"), "w") as f:
            json.dump(summaries, f, indent=2)
        with open(out, "w") as f:
            f.write(f"Table 1 at this scale: {train_config.iterations} iterations of batch "
                    f"{train_config.batch_size} each, test split ({eval_scenes} scenes). Numbers in %.\n\n"
                    f"{table}\n")
    log("\n" + table + f"\n\nwrote {out}")
    return summaries


# ---- over seeds: mean +- standard deviation, and which differences exceed the spread -----------

# the metrics the seeds table reports (keys of minifpn.detection.metrics.evaluate). AR@10 is there
# because AR@100 barely feels clutter: 100 proposals per scene of at most 5 digits find a digit
# even when many clutter patches outrank it; AR@10 and AP do not.
SEED_COLUMNS = {"AR@100": "AR@100", "AR@10": "AR@10", "AR_small": "AR_s", "AR_medium": "AR_m",
                "AR_large": "AR_l", "AP": "AP", "AP50": "AP50"}


def aggregate(runs: dict, columns: dict = SEED_COLUMNS) -> dict:
    """Mean and standard deviation over seeds. ``runs``: {seed: [summary, ...]} (summaries as
    ``run_ablation`` returns them; every seed must hold the same settings) ->
    {setting: {metric: {"mean", "std", "values"}}}, in %, for every metric of ``columns``.

    ``std`` is the sample standard deviation (ddof = 1) over the seeds, 0.0 for a single seed;
    ``values`` lists each seed's number, in the order of ``runs``. A metric a seed could not
    measure (-1: no object of that size in its test scenes, as in COCO) is None there and left
    out of mean and std; with none measured, mean and std are None."""
    if not runs:
        raise ValueError("aggregate needs the summaries of at least one seed, got none")
    per_seed = {seed: {s["setting"]: s["metrics"] for s in summaries} for seed, summaries in runs.items()}
    settings = list(next(iter(per_seed.values())))
    for seed, rows in per_seed.items():
        if list(rows) != settings:
            raise ValueError(f"every seed must hold the same settings {settings}; "
                             f"seed {seed} holds {list(rows)}")
    table = {}
    for name in settings:
        table[name] = {}
        for key in columns:
            values = [100 * float(rows[name][key]) if rows[name][key] >= 0 else None
                      for rows in per_seed.values()]
            known = [v for v in values if v is not None]
            mean = statistics.fmean(known) if known else None
            std = statistics.stdev(known) if len(known) > 1 else (0.0 if known else None)
            table[name][key] = {"mean": mean, "std": std, "values": values}
    return table


def beyond_spread(table: dict, a: str, b: str, metric: str = "AR_small") -> dict:
    """Is the difference of setting ``a`` and ``b`` on ``metric`` larger than their spread?
    ``table`` as ``aggregate`` returns it. The rule, stated so it can be checked by hand:
    |mean_a - mean_b| > std_a + std_b. Returns {"difference": mean_a - mean_b, "spread":
    std_a + std_b, "beyond": bool}; all three None where either was measured by no seed."""
    x, y = table[a][metric], table[b][metric]
    if x["mean"] is None or y["mean"] is None:
        return {"difference": None, "spread": None, "beyond": None}
    difference, spread = x["mean"] - y["mean"], x["std"] + y["std"]
    return {"difference": difference, "spread": spread, "beyond": bool(abs(difference) > spread)}


def markdown_table_over_seeds(table: dict, base: str = "fpn", metric: str = "AR_small") -> str:
    """A markdown table of ``aggregate``'s output: "mean ± std" per setting and metric, in %,
    then one line per other setting saying whether its ``metric`` differs from ``base``'s by
    more than the spread (``beyond_spread``)."""
    headings = ["setting", *SEED_COLUMNS.values()]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for name, row in table.items():
        cells = [f"{row[key]['mean']:.1f} ± {row[key]['std']:.1f}" if row[key]["mean"] is not None
                 else "n/a" for key in SEED_COLUMNS]
        lines.append("| " + " | ".join([SETTINGS[name].label, *cells]) + " |")
    if base in table:
        lines.append("")
        column = SEED_COLUMNS[metric]
        for name in table:
            if name != base:
                d = beyond_spread(table, base, name, metric)
                if d["difference"] is None:
                    lines.append(f"* {column}: ({SETTINGS[base].letter}) - ({SETTINGS[name].letter}): n/a")
                    continue
                verdict = "exceeds" if d["beyond"] else "does not exceed"
                lines.append(f"* {column}: ({SETTINGS[base].letter}) - ({SETTINGS[name].letter}) = "
                             f"{d['difference']:+.1f}, which {verdict} the spread {d['spread']:.1f} "
                             f"(std + std)")
    return "\n".join(lines)


def run_over_seeds(settings, detector_config, train_config, out_dir: str, eval_scenes: int, seeds,
                   **kwargs) -> dict:
    """``run_ablation`` once per seed in ``seeds`` (weights, scenes and sampling all follow the
    seed; each seed is evaluated on its own test split), into ``out_dir``/seed<S>/; then
    ``write_over_seeds`` into ``out_dir``. ``kwargs`` go to ``run_ablation``. Returns {seed: summaries}."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    log = kwargs.get("log", print)
    runs = {}
    for seed in seeds:
        log(f"\n##### seed {seed} #####")
        runs[seed] = run_ablation(settings, dataclasses.replace(detector_config, seed=seed),
                                  dataclasses.replace(train_config, seed=seed),
                                  os.path.join(out_dir, f"seed{seed}"), eval_scenes, **kwargs)
    out = write_over_seeds(runs, out_dir, train_config.scenes)
    log("\n" + markdown_table_over_seeds(aggregate(runs)) + f"\n\nwrote {out}")
    return runs


def write_over_seeds(runs: dict, out_dir: str, scenes: dict, name: str = "table1_seeds") -> str:
    """Write ``out_dir``/``name``.json ({"seeds", "scenes", "table": ``aggregate(runs)``, "runs"})
    and ``name``.md (a header, then ``markdown_table_over_seeds``); returns the .md path.
    ``runs``: {seed: summaries}; ``scenes``: the SceneConfig overrides they were trained and
    tested on ({} for the default scenes)."""
    table, seeds = aggregate(runs), list(runs)
    first, out = next(iter(runs.values()))[0], os.path.join(out_dir, f"{name}.md")
    if world().rank > 0:  # with --workers, rank 0 writes the one set of outputs
        return out
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"seeds": seeds, "scenes": scenes, "table": table,
                   "runs": {str(seed): summaries for seed, summaries in runs.items()}}, f, indent=2)
    with open(out, "w") as f:
        f.write(f"Table 1 over seeds {', '.join(map(str, seeds))}: {first['iterations']} iterations "
                f"({first['images_seen']} images) each, scenes {scenes or 'default'}, test split of each "
                f"seed ({first['test_scenes']} scenes). Mean ± sample std over the seeds, in %.\n\n"
                f"{markdown_table_over_seeds(table)}\n")
    return out


def collect_summaries(paths) -> dict:
    """Runs made by separate commands, as one ``runs`` for ``aggregate``: ``paths`` of
    metrics.json files (``train_and_evaluate``'s summaries) -> {seed: [summary, ...]}, seeds in
    increasing order, settings in the paper's order, keeping only the settings every seed has.
    The seed is read from each summary's detector_config; two runs of one (seed, setting) are refused."""
    found = {}
    for path in paths:
        with open(path) as f:
            summary = json.load(f)
        key = (summary["detector_config"]["seed"], summary["setting"])
        if key in found:
            raise ValueError(f"two runs of seed {key[0]}, setting {key[1]}: {found[key][0]} and {path}")
        found[key] = (path, summary)
    seeds = sorted({seed for seed, _ in found})
    common = [name for name in SETTINGS if all((seed, name) in found for seed in seeds)]
    return {seed: [found[seed, name][1] for name in common] for seed in seeds}


# ---- the regime map: from scratch against the paper's regime (docs/results.md) -------------------

# How the backbone is trained, as DetectorConfig fields: every weight from scratch with live batch
# norm, or the paper's fine-tuning of a pre-trained backbone (stem and C2's stage frozen, frozen BN).
REGIMES = {"scratch": {"pretrained": False, "freeze_at": 0, "norm": "bn"},
           "paper": {"pretrained": True, "freeze_at": 2, "norm": "frozen_bn"}}
REGIME_LABELS = {"scratch": "from scratch", "paper": "paper's regime (pre-trained, freeze_at 2, frozen BN)"}
# the 10-digit detector's columns (keys of minifpn.detection.metrics.evaluate, as table headings)
K10_COLUMNS = {"AP": "AP", "AP50": "AP50", "AP_small": "AP_s", "AR@100": "AR@100", "AR_small": "AR_s"}


def regime_of(detector_config: dict) -> str:
    """"scratch" or "paper" for a saved DetectorConfig (a config that predates the fields is from
    scratch); a ValueError for any other combination."""
    fields = {k: detector_config.get(k, v) for k, v in REGIMES["scratch"].items()}
    for name, regime in REGIMES.items():
        if fields == regime:
            return name
    raise ValueError(f"the detector config {fields} is neither regime of {REGIMES}")


def summaries_from_reference(info: dict) -> list:
    """The pair a ``minifpn reference`` run wrote (its reference.json, as a dict) as summaries,
    (c) fpn first: [{"setting", "metrics", "detector_config"}, ...]."""
    return [{"setting": name, "metrics": entry["metrics"], "detector_config": entry["detector_config"]}
            for name, entry in info["detectors"].items()]


def regime_effect(tables: dict, a: str = "fpn", b: str = "bottom_up", metric: str = "AR_small") -> dict:
    """How the difference a - b on ``metric`` moves from scratch to the paper's regime. ``tables``:
    {regime: aggregate's table}, the two regimes over the same seeds. Per regime: each seed's own
    difference (paired by seed), their mean and std, and ``beyond_spread``'s verdict, whose spread
    is the page's rule, std_a + std_b of the two settings. Then "change" = mean(paper) -
    mean(scratch), beyond when it exceeds std(paper) + std(scratch) of the per-seed differences
    (the spread of the quantity that changes)."""
    out = {}
    for regime, table in tables.items():
        diffs = [x - y for x, y in zip(table[a][metric]["values"], table[b][metric]["values"])
                 if x is not None and y is not None]
        out[regime] = {"per_seed": diffs, "mean": statistics.fmean(diffs),
                       "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                       **beyond_spread(table, a, b, metric)}
    if {"scratch", "paper"} <= set(out):
        change = out["paper"]["mean"] - out["scratch"]["mean"]
        spread = out["paper"]["std"] + out["scratch"]["std"]
        out["change"] = {"difference": change, "spread": spread, "beyond": bool(abs(change) > spread)}
    return out


def regime_map(rpn: dict, k10: dict) -> dict:
    """Everything the regime map shows. ``rpn``: {scenes name: {regime: runs}} of Table 1's RPN
    runs (runs as ``collect_summaries`` returns them); ``k10``: {regime: runs} of the 10-digit
    (c)/(d) pairs. Returns {"rpn": {scenes: {regime: table}}, "k10": {regime: table}, "effects":
    {name: regime_effect}} (tables as ``aggregate``'s, in %)."""
    data = {"rpn": {scenes: {regime: aggregate(runs) for regime, runs in by_regime.items()}
                    for scenes, by_regime in rpn.items()},
            "k10": {regime: aggregate(runs, K10_COLUMNS) for regime, runs in k10.items()}, "effects": {}}
    for scenes, tables in data["rpn"].items():
        for other in ("bottom_up", "p2_only"):
            data["effects"][f"{scenes}: AR_s (c) - ({SETTINGS[other].letter})"] = regime_effect(
                tables, "fpn", other, "AR_small")
    for metric, column in (("AP", "AP"), ("AP_small", "AP_s")):
        data["effects"][f"10 digits: {column} (c) - (d)"] = regime_effect(data["k10"], "fpn", "bottom_up",
                                                                          metric)
    return data


def markdown_regime_map(data: dict) -> str:
    """The regime map as markdown: one table per condition (mean ± std in %, each regime a column),
    then one line per effect: (c) - (x) in each regime, with its spread, and its change."""
    lines = []
    conditions = [(f"Table 1 RPN, {scenes} scenes", tables, {"AR_small": "AR_s", "AR@100": "AR@100"})
                  for scenes, tables in data["rpn"].items()]
    conditions.append(("10-digit detector, plain scenes", data["k10"],
                       {"AP": "AP", "AP_small": "AP_s", "AR_small": "AR_s"}))
    for title, tables, columns in conditions:
        regimes = list(tables)
        lines += [f"**{title}**", "", "| setting | metric | " + " | ".join(REGIME_LABELS[r] for r in regimes)
                  + " |", "|---|---|" + "---|" * len(regimes)]
        for name in next(iter(tables.values())):
            for key, column in columns.items():
                cells = [_mean_std(tables[r][name][key]) for r in regimes]
                lines.append(f"| ({SETTINGS[name].letter}) {name} | {column} | " + " | ".join(cells) + " |")
        lines.append("")
    for name, effect in data["effects"].items():
        parts = [f"{REGIME_LABELS[r].split(' (')[0]} {effect[r]['difference']:+.1f} (spread "
                 f"{effect[r]['spread']:.1f}, {'beyond' if effect[r]['beyond'] else 'within'}; per seed "
                 + ", ".join(f"{d:+.1f}" for d in effect[r]["per_seed"]) + ")"
                 for r in REGIMES if r in effect]
        change = effect.get("change")
        tail = (f"; change {change['difference']:+.1f} (spread {change['spread']:.1f}, "
                f"{'beyond' if change['beyond'] else 'within'})") if change else ""
        lines.append(f"* {name}: " + "; ".join(parts) + tail)
    return "\n".join(lines)


def _mean_std(cell: dict) -> str:
    return "n/a" if cell["mean"] is None else f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def plot_regime_map(data: dict):
    """The regime map as a figure: AR_s of (c), (d), (f) per kind of scenes, then AP and AP_s of
    the 10-digit (c) and (d). In each panel, two markers per setting (from scratch, the paper's
    regime: the mean over seeds as a square, ± std as its bar), each seed a dot beside it; the
    AR_s panels give the paper's own AR^1k_s in their titles. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    panels = [(f"RPN, {scenes} scenes: AR_s", tables, "AR_small") for scenes, tables in data["rpn"].items()]
    panels += [("10 digits: AP", data["k10"], "AP"), ("10 digits: AP_s", data["k10"], "AP_small")]
    colours = {"scratch": "tab:gray", "paper": "tab:blue"}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.9), squeeze=False)
    seeds = set()
    for ax, (title, tables, metric) in zip(axes[0], panels):
        names = list(next(iter(tables.values())))
        values = []
        for j, regime in enumerate(tables):
            x = [i + (j - 0.5) * 0.38 for i in range(len(names))]
            cells = [tables[regime][name][metric] for name in names]
            nan = float("nan")  # a setting no seed measured: no marker
            ax.errorbar(x, [nan if c["mean"] is None else c["mean"] for c in cells],
                        yerr=[nan if c["std"] is None else c["std"] for c in cells], fmt="s", ms=7,
                        capsize=4, color=colours[regime], label=REGIME_LABELS[regime].split(" (")[0])
            for xi, c in zip(x, cells):
                measured = [v for v in c["values"] if v is not None]  # None: a seed without such digits
                ax.plot([xi + 0.08] * len(measured), measured, "o", color="black", markersize=3,
                        label="one seed" if xi == x[0] and j == 0 else None)
                values += measured
                seeds.add(len(c["values"]))
        ax.set_ylim(max(0.0, min(values) - 8), max(values) + 4)  # the differences, not the zero line
        ax.set_xticks(range(len(names)), [f"({SETTINGS[n].letter}) {n}" for n in names], fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        if title.startswith("RPN, plain") and all(n in PAPER_AR1K for n in names):  # COCO: no clutter
            title += "\npaper's AR^1k_s: " + ", ".join(f"({SETTINGS[n].letter}) {PAPER_AR1K[n][1]:.1f}"
                                                       for n in names)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("%")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(f"The regime map: mean ± std over {max(seeds)} seeds, each seed a dot", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


# ---- learning curves: (c) and (d) at every kept checkpoint of a run (docs/results/learning_curve.py) --

def learning_curves(recipe: dict, a: str = "fpn", b: str = "bottom_up", metric: str = "AR_small") -> dict:
    """One recipe of docs/results/learning_curve.json ({"seeds", "runs": {"SETTING/SEED":
    {"points": {step: {"metrics"}}}}}) -> {"steps": [...], a: cells, b: cells, "difference": cells},
    one cell per step: {"mean", "std", "values"} over the seeds, in % (``aggregate``'s rule); the
    difference is a - b seed by seed. ``crossings``: the steps after which the mean difference
    changed sign."""
    seeds = recipe["seeds"]

    def points(name, seed):  # {step: metric in %} of one run
        run = recipe["runs"][f"{name}/{seed}"]["points"]
        return {int(step): 100 * p["metrics"][metric] for step, p in run.items()}

    per = {name: [points(name, seed) for seed in seeds] for name in (a, b)}
    steps = sorted(per[a][0])
    if any(sorted(run) != steps for runs in per.values() for run in runs):
        raise ValueError(f"every run must keep the same steps {steps}")

    def cells(values_at):
        return [_cell([values_at(i, step) for i in range(len(seeds))]) for step in steps]

    out = {"steps": steps, "seeds": seeds, "metric": metric,
           a: cells(lambda i, step: per[a][i][step]), b: cells(lambda i, step: per[b][i][step]),
           "difference": cells(lambda i, step: per[a][i][step] - per[b][i][step])}
    means = [c["mean"] for c in out["difference"]]
    out["crossings"] = [steps[i + 1] for i in range(len(steps) - 1) if (means[i] > 0) != (means[i + 1] > 0)]
    return out


def _cell(values: list) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def markdown_learning_curves(curves: dict, a: str = "fpn", b: str = "bottom_up") -> str:
    """``learning_curves``' output as a markdown table: one row per step, mean ± std of a, b and
    a - b, each seed's own difference, and whether it is beyond the spread (std_a + std_b)."""
    la, lb = SETTINGS[a].letter, SETTINGS[b].letter
    lines = [f"| step | ({la}) {a} | ({lb}) {b} | ({la}) − ({lb}) | per seed | beyond the spread? |",
             "|---|---|---|---|---|---|"]
    for i, step in enumerate(curves["steps"]):
        x, y, d = curves[a][i], curves[b][i], curves["difference"][i]
        beyond = abs(d["mean"]) > x["std"] + y["std"]
        lines.append(f"| {step} | {_mean_std(x)} | {_mean_std(y)} | {d['mean']:+.1f} | "
                     + ", ".join(f"{v:+.1f}" for v in d["values"]) + f" | {'yes' if beyond else 'no'} |")
    return "\n".join(lines)


def plot_learning_curves(results: dict, a: str = "fpn", b: str = "bottom_up"):
    """docs/results/learning_curve.json drawn, three panels per row: per recipe, the metric of a and
    b against steps (mean over seeds, ± std shaded, each seed a thin line); last, a - b of every
    recipe, with the paper's direction (a above b) shaded. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    rows = -(-(len(results) + 1) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(12, 3.4 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, (name, recipe) in zip(axes, results.items()):
        _plot_recipe(ax, name, learning_curves(recipe, a, b), a, b)
    all_curves = {name: learning_curves(r, a, b) for name, r in results.items()}
    _plot_differences(axes[len(results)], all_curves, a, b)
    for ax in axes[len(results) + 1:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _plot_recipe(ax, name: str, curves: dict, a: str, b: str) -> None:
    colours = {a: "tab:blue", b: "tab:orange"}
    for s in (a, b):
        mean, std = [c["mean"] for c in curves[s]], [c["std"] for c in curves[s]]
        ax.plot(curves["steps"], mean, "o-", color=colours[s], label=f"({SETTINGS[s].letter}) {s}")
        ax.fill_between(curves["steps"], [m - e for m, e in zip(mean, std)],
                        [m + e for m, e in zip(mean, std)], color=colours[s], alpha=0.2)
        for k in range(len(curves["seeds"])):
            ax.plot(curves["steps"], [c["values"][k] for c in curves[s]], color=colours[s], lw=0.6, alpha=0.6)
    ax.set_title(f"{name}: {curves['metric']}, {len(curves['seeds'])} seeds", fontsize=9)
    ax.set_xlabel("training step (a checkpoint of one run)", fontsize=8)
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _plot_differences(ax, curves: dict, a: str, b: str) -> None:
    styles = [("o-", "black"), ("s--", "black"), ("^-", "tab:purple"), ("v--", "tab:green")]
    for k, (name, c) in enumerate(curves.items()):
        fmt, colour = styles[k % len(styles)]
        ax.errorbar(c["steps"], [d["mean"] for d in c["difference"]],
                    yerr=[d["std"] for d in c["difference"]], fmt=fmt, capsize=3, color=colour,
                    mfc="white" if k % 2 else colour, label=name)
    ax.axhline(0, color="0.4", lw=0.8)
    top = max(abs(v) for v in ax.get_ylim())
    ax.axhspan(0, top, color="tab:green", alpha=0.1)
    ax.text(0.02, 0.97, f"paper's direction: ({SETTINGS[a].letter}) above ({SETTINGS[b].letter})",
            transform=ax.transAxes, va="top", fontsize=8, color="tab:green")
    ax.set_ylim(-top, top)
    ax.set_title(f"({SETTINGS[a].letter}) − ({SETTINGS[b].letter}), mean ± std over seeds", fontsize=9)
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel("points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


__all__ = ["CHOICES", "ITERATIONS", "LETTERS", "PAPER_AR100", "PAPER_AR1K", "PAPER_RPN", "SEED_COLUMNS",
           "SETTINGS", "Setting", "aggregate", "beyond_spread", "collect_summaries", "markdown_table",
           "markdown_table_over_seeds", "resolve", "run_ablation", "run_over_seeds", "write_over_seeds",
           "K10_COLUMNS", "REGIMES", "REGIME_LABELS", "markdown_regime_map", "plot_regime_map",
           "regime_effect", "regime_map", "regime_of", "summaries_from_reference", "learning_curves",
           "markdown_learning_curves", "plot_learning_curves"]
