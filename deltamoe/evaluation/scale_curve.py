"""Bits per byte against stage-1 tokens, over pipeline runs at several sizes (e.g. `deltamoe pipeline demo --scale S`).

Each run is a pipeline workdir: its manifest.json gives the stage-1 tokens (iterations x global batch x sequence
length of the first MoE arm, which the dense-CPT baseline matches) and the stage times; its eval/<model>/ folders the
per-example samples. Runs at a larger scale evaluate more examples, so every point is recomputed from the samples on
the examples all runs and models share (a task's first n), which keeps the curve on one fixed set of texts.

Per language, the value of a domain ("in"/"out", the suite's `domain` field of perplexity tasks) is the mean over its
tasks; the group value (original / new languages) the mean over languages, as in `deltamoe report`.
Writes scale_curve.md, scale_curve.json and scale_curve.png (one panel per group x domain).

Example:

  deltamoe scale-curve runs/demo runs/demo-s4 runs/demo-s16 --out runs/scale-curve
  deltamoe scale-curve runs/demo runs/demo-s4 --eval-dir eval-curve eval --out runs/scale-curve   # other evals first
  deltamoe scale-curve runs/demo-s16 --earlier docs/scale-curve/scale_curve.json --out runs/scale-curve

--earlier adds the runs and points of an earlier scale_curve.json (whose workdirs may be gone) as they are; it is
refused unless the new runs share exactly the examples it was computed on (the same task x language keys and, per
key, the same example lines, or for a file that predates recorded lines the same count: the same `--limit`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.outputs import atomic_output_dir, check_output_dir
from deltamoe.evaluation import bootstrap
from deltamoe.evaluation.report import _read_samples, load_results

BASELINE = "dense-cpt+paramdelta"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="pipeline workdirs (manifest.json and eval/<model>/ inside)")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="eval folder names to plot (default: the first MoE arm and dense-cpt+paramdelta, with "
                             "base and post as references)")
    parser.add_argument("--eval-dir", nargs="+", default=["eval"], metavar="NAME",
                        help="folders of a workdir holding <model>/results.json, searched in this order per model "
                             "(default: eval, the pipeline's)")
    parser.add_argument("--earlier", type=Path, default=None, metavar="SCALE_CURVE_JSON",
                        help="an earlier scale_curve.json whose runs and points join this curve (same examples)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def read_run(workdir: Path, eval_dirs: tuple[str, ...] = ("eval",)) -> dict:
    """Stage-1 tokens, wall times and eval result documents of one pipeline workdir."""
    manifest_path = workdir / "manifest.json"
    if not manifest_path.is_file():
        raise DeltaMoEError(f"{workdir}: no manifest.json (expected a `deltamoe pipeline` workdir)")
    manifest = json.loads(manifest_path.read_text())
    try:
        arm = manifest["config"]["arms"][0]
        train = arm["stage1"]["train"]
        tokens = train["train_iters"] * train["global_batch_size"] * train["seq_length"]
        dense = manifest["config"]["dense_baseline"]["train"]
    except (KeyError, IndexError, TypeError) as e:
        raise DeltaMoEError(f"{manifest_path}: no stage-1 recipe in its config ({e!r})") from None
    dense_tokens = dense["train_iters"] * dense["global_batch_size"] * dense["seq_length"]
    if dense_tokens != tokens:
        raise DeltaMoEError(f"{manifest_path}: dense CPT trains {dense_tokens} tokens, stage 1 {tokens}: not comparable")
    evals = {}
    for folder in eval_dirs:  # the first folder that has a model wins
        for p in sorted((workdir / folder).glob("*")):
            if (p / "results.json").is_file() and p.name not in evals:
                evals[p.name] = load_results(p)
    if not evals:
        raise DeltaMoEError(f"{workdir}: no <model>/results.json under {', '.join(eval_dirs)}")
    seconds = {name: s.get("seconds") for name, s in manifest.get("stages", {}).items() if s.get("seconds") is not None}
    return {"workdir": str(workdir), "stage1_tokens": tokens, "moe_label": arm["label"], "evals": evals,
            "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1)}


def curve(runs: list[dict], models: list[str]) -> dict:
    """Points per model and run: bits per byte by group x domain, on the examples every run and model shares."""
    keys = {}  # (task, language) -> (domain, group)
    for run in runs:
        for doc in run["evals"].values():
            for r in doc["results"]:
                if r["type"] == "perplexity" and r.get("domain"):
                    keys[(r["task"], r["language"])] = (r["domain"], r["group"])
    if not keys:
        raise DeltaMoEError("no perplexity task with a domain in these runs' results (the suite's `domain` field)")
    for run in runs:
        missing = [m for m in models if m not in run["evals"]]
        if missing:
            raise DeltaMoEError(f"{run['workdir']}: no eval results for {missing} (has {sorted(run['evals'])})")
    samples = {(i, m, key): _read_samples(run["evals"][m], *key) for i, run in enumerate(runs) for m in models for key in keys}
    absent = [f"{runs[i]['workdir']}/eval/{m}: {t}/{lang}" for (i, m, (t, lang)), s in samples.items() if not s]
    if absent:
        raise DeltaMoEError(f"samples missing: {', '.join(absent[:4])}")
    shared = {key: sorted(set.intersection(*(set(samples[(i, m, key)]) for i in range(len(runs)) for m in models)))
              for key in keys}
    points = []
    for i, run in enumerate(runs):
        for m in models:
            by_lang: dict[tuple[str, str, str], list[float]] = {}
            for key, (domain, group) in keys.items():
                bits, sizes = bootstrap.bits_per_byte_samples([samples[(i, m, key)][line] for line in shared[key]])
                by_lang.setdefault((domain, group, key[1]), []).append(sum(bits) / sum(sizes))
            values: dict[str, list[float]] = {}
            for (domain, group, _), v in by_lang.items():
                values.setdefault(f"{group}/{domain}", []).append(sum(v) / len(v))
            points.append({"run": run["workdir"], "model": m, "stage1_tokens": run["stage1_tokens"],
                           "values": {k: sum(v) / len(v) for k, v in sorted(values.items())}})
    return {"models": models, "examples": {f"{t}/{lang}": len(v) for (t, lang), v in shared.items()},
            "lines": {f"{t}/{lang}": v for (t, lang), v in shared.items()},
            "runs": [{k: v for k, v in run.items() if k != "evals"} for run in runs], "points": points}


def join_earlier(result: dict, earlier: dict, source: Path) -> dict:
    """result with an earlier curve's runs and points first, refused unless both were computed on the same examples."""
    for field in ("models", "examples", "runs", "points"):
        if field not in earlier:
            raise DeltaMoEError(f"{source}: no '{field}' (expected a `deltamoe scale-curve` scale_curve.json)")
    if earlier["examples"] != result["examples"]:
        raise DeltaMoEError(f"{source}: computed on examples {earlier['examples']}, these runs share "
                            f"{result['examples']}: evaluate them with the same tasks and --limit")
    if "lines" in earlier and earlier["lines"] != result["lines"]:
        differ = [k for k in result["lines"] if earlier["lines"].get(k) != result["lines"][k]]
        raise DeltaMoEError(f"{source}: computed on other example lines of {', '.join(differ)}")
    missing = [m for m in result["models"] if m not in earlier["models"]]
    if missing:
        raise DeltaMoEError(f"{source}: has no points for {missing} (has {earlier['models']}); choose --models")
    known = {r["workdir"] for r in earlier["runs"]}
    again = [r["workdir"] for r in result["runs"] if r["workdir"] in known]
    if again:
        raise DeltaMoEError(f"{source}: already has the run {again[0]}")
    points = [p for p in earlier["points"] if p["model"] in result["models"]] + result["points"]
    runs = sorted(earlier["runs"] + result["runs"], key=lambda r: r["stage1_tokens"])
    order = {r["workdir"]: i for i, r in enumerate(runs)}
    return {**result, "runs": runs, "points": sorted(points, key=lambda p: order[p["run"]]),
            "earlier": str(source)}


def curve_markdown(result: dict) -> str:
    columns = sorted({k for p in result["points"] for k in p["values"]})
    out = ["# Bits per byte against stage-1 tokens", "",
           "Each value is recomputed on the examples every run and model shares: "
           + ", ".join(f"{k} n={n}" for k, n in result["examples"].items()) + ". ↓ is better.", "",
           "| run | stage-1 tokens | pipeline seconds | model | " + " | ".join(columns) + " |",
           "|---|---|---|---|" + "---|" * len(columns)]
    seconds = {r["workdir"]: r["total_seconds"] for r in result["runs"]}
    for p in result["points"]:
        cells = " | ".join(f"{p['values'][c]:.4f}" if c in p["values"] else "–" for c in columns)
        out.append(f"| {p['run']} | {p['stage1_tokens']} | {seconds[p['run']]} | {p['model']} | {cells} |")
    return "\n".join(out) + "\n"


def plot_curve(result: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = sorted({k for p in result["points"] for k in p["values"]})
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.4), dpi=100, squeeze=False)
    for ax, column in zip(axes[0], columns):
        for model in result["models"]:
            pts = sorted((p["stage1_tokens"], p["values"][column]) for p in result["points"]
                         if p["model"] == model and column in p["values"])
            trained = model not in ("base", "post")
            if trained:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=model)
            else:  # the untrained references do not depend on the run's tokens
                ax.axhline(pts[0][1], linestyle="--", linewidth=1, color="grey" if model == "base" else "black",
                           label=model)
        ax.set_xscale("log")
        ax.set_xlabel("stage-1 tokens")
        ax.set_ylabel("bits per byte (lower is better)")
        ax.set_title(column.replace("/", ", ").replace("original", "original language").replace("new", "new languages")
                     .replace(", in", ", in domain").replace(", out", ", out of domain"), fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    check_output_dir(args.out, inputs=args.runs, overwrite=args.overwrite)
    runs = sorted((read_run(Path(r), tuple(args.eval_dir)) for r in args.runs), key=lambda r: r["stage1_tokens"])
    # By default the first MoE arm and the dense baseline, with base and post as references where every run has them.
    models = args.models or [m for m in ("base", "post", runs[0]["moe_label"], BASELINE)
                             if m not in ("base", "post") or all(m in run["evals"] for run in runs)]
    result = curve(runs, models)
    if args.earlier is not None:
        try:
            earlier = json.loads(args.earlier.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DeltaMoEError(f"--earlier {args.earlier}: not a readable scale_curve.json ({e})") from None
        result = join_earlier(result, earlier, args.earlier)
    with atomic_output_dir(args.out, inputs=args.runs, overwrite=args.overwrite) as tmp:
        (tmp / "scale_curve.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "scale_curve.md").write_text(curve_markdown(result))
        plot_curve(result, tmp / "scale_curve.png")
    print(f"wrote {args.out}/scale_curve.md, scale_curve.json and scale_curve.png ({len(result['runs'])} runs)")
    return 0
