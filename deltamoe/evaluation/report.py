"""Compare `deltamoe eval` results of several models: per task x language, original-language and new-language
averages side by side, as Markdown (report.md), JSON (report.json) and PNG plots (bars per language for each task's
main metric, routing heatmaps layer x expert per language for MoE models).

An average over a group is the plain mean over that group's languages of the per-language value (each language
counts once, whatever its number of examples), the convention of multilingual leaderboards such as Okapi's.
Models are shown in the order given; names come from each result's `model.name` unless --names is passed.

With --expert-allocation-map (the trainer's map: {"experts": {"es": [1, 2], ...}, "shared_experts": [0]}), the report
adds, for each MoE model and language, the share of top-k choices that land on that language's allocated experts
(mean over layers), measured on untagged text: how well the router alone follows the allocation (docs/allocation.md).
With several MoE models, plots/routing_compare.png puts their layer x expert heatmaps side by side on one scale.

Perplexity tasks marked with a `domain` in the suite ("in": held-out text of the training genres, "out": another
genre) get a table of bits per byte by domain, side by side. Every bits-per-byte task (perplexity, qa_loglik) whose
per-example samples are in the eval folders gets its noise: n, a 95% percentile bootstrap interval per model (1000
resamples, fixed seed) and each model's paired difference from the first model with its interval
(deltamoe/evaluation/bootstrap.py).

Example:

  deltamoe report runs/eval_base runs/eval_dense_paramdelta runs/eval_deltamoe --out runs/report \\
      --names base "dense CPT + ParamΔ" DeltaMoE
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.outputs import atomic_output_dir, check_output_dir

# The metric plotted for each task type; every metric is in the tables.
PRIMARY_METRIC = {"perplexity": "bits_per_byte", "multiple_choice": "acc", "translation": "chrf_pp",
                  "instruction_following": "prompt_level_acc", "qa_loglik": "bits_per_byte", "routing": "expert_0_share"}
LOWER_IS_BETTER = {"bits_per_byte", "byte_perplexity", "token_perplexity", "word_perplexity"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="eval output folders (or their results.json files)")
    parser.add_argument("--out", required=True, help="report folder (must not exist unless --overwrite)")
    parser.add_argument("--names", nargs="+", default=None, help="model names, one per result, in the same order")
    parser.add_argument("--expert-allocation-map", default=None, metavar="JSON|FILE",
                        help="language -> experts map (as the trainer's flag); adds the share of routing on each "
                             "language's allocated experts per MoE model")
    parser.add_argument("--note", default="", help="a sentence shown under the title (e.g. what the run's budget can "
                                                    "and cannot show)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report folder")


def load_results(path: str | Path) -> dict:
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise DeltaMoEError(f"{path}: no results.json (expected a `deltamoe eval` output folder)")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DeltaMoEError(f"{file}: not valid JSON ({e.msg})") from None
    for key in ("model", "languages", "results"):
        if key not in doc:
            raise DeltaMoEError(f"{file}: missing field {key!r}; is it a `deltamoe eval` results.json?")
    doc["_file"] = str(file)
    doc["_samples_dir"] = str(file.parent / "samples")
    return doc


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def allocated_shares(routing: dict[str, dict[str, list[list[float]]]], allocation: dict) -> dict[str, dict[str, float]]:
    """model -> language -> share of top-k choices on the language's allocated experts (+ shared), mean over layers.

    `allocation` is the trainer's map, {"experts": {lang: [e, ...]}, "shared_experts": [...]}, checked by the same
    `ExpertAllocation` against each model's number of experts; languages without an entry are left out (they may use
    every expert, so the share would be 1 by definition).
    """
    from deltamoe.megatron_ext.moe.allocation import ExpertAllocation

    experts = allocation.get("experts")
    if not isinstance(experts, dict) or not experts:
        raise DeltaMoEError(f"--expert-allocation-map: expected {{'experts': {{language: [experts]}}, ...}}, got {allocation!r}")
    shared = allocation.get("shared_experts", [])
    for key, members in [*(("experts." + k, v) for k, v in experts.items()), ("shared_experts", shared)]:
        if not isinstance(members, list):
            raise DeltaMoEError(f"--expert-allocation-map: {key} must be a list of expert indices, got {members!r}")
    out: dict[str, dict[str, float]] = {}
    for model, by_lang in routing.items():
        num_experts = len(next(iter(by_lang.values()))[0])
        try:
            checked = ExpertAllocation(languages=list(experts), experts=experts, shared_experts=shared,
                                       num_experts=num_experts, topk=1)
        except DeltaMoEError as e:
            raise DeltaMoEError(f"--expert-allocation-map does not fit model {model!r}: {e}") from None
        for lang, table in by_lang.items():
            if lang in experts:
                allowed = checked.allowed_experts(lang)
                out.setdefault(model, {})[lang] = sum(sum(row[e] for e in allowed) for row in table) / len(table)
    return out


BITS_PER_BYTE_TASKS = ("perplexity", "qa_loglik")


def _read_samples(doc: dict, task: str, language: str) -> dict[int, dict] | None:
    """line -> sample of one task x language of one eval folder, None when the samples file is absent."""
    if "_samples_dir" not in doc:
        return None
    path = Path(doc["_samples_dir"]) / f"{task}_{language}.jsonl"
    if not path.is_file():
        return None
    samples = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DeltaMoEError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            samples[record.get("line", n)] = record
    return samples


def noise_rows(docs: list[dict], names: list[str]) -> list[dict]:
    """Per bits-per-byte task x language: n, each model's value and 95% interval, and its paired difference from the
    first model (the examples all models share; a model without samples is left out of that row)."""
    from deltamoe.evaluation import bootstrap

    keys = list(dict.fromkeys((r["task"], r["language"]) for d in docs for r in d["results"]
                              if r["type"] in BITS_PER_BYTE_TASKS))
    rows = []
    for task, language in keys:
        per_model = {name: _read_samples(doc, task, language) for name, doc in zip(names, docs)}
        per_model = {name: s for name, s in per_model.items() if s}
        if not per_model:
            continue
        lines = sorted(set.intersection(*(set(s) for s in per_model.values())))
        if not lines:
            continue
        series = {name: bootstrap.bits_per_byte_samples([s[line] for line in lines]) for name, s in per_model.items()}
        reference = names[0] if names[0] in series else None
        models = {}
        for name, (bits, sizes) in series.items():
            entry = {"bits_per_byte": sum(bits) / sum(sizes), "interval": list(bootstrap.ratio_interval(bits, sizes))}
            if reference is not None and name != reference:
                ref_bits, ref_sizes = series[reference]
                entry["difference"] = entry["bits_per_byte"] - sum(ref_bits) / sum(ref_sizes)
                entry["difference_interval"] = list(bootstrap.paired_difference_interval(ref_bits, ref_sizes, bits, sizes))
            models[name] = entry
        rows.append({"task": task, "language": language, "n": len(lines), "reference": reference, "models": models,
                     "resamples": bootstrap.RESAMPLES, "seed": bootstrap.SEED, "level": bootstrap.LEVEL})
    return rows


def domain_table(docs: list[dict], names: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """domain ("in"/"out") -> model -> language -> bits per byte (mean over that domain's perplexity tasks)."""
    collected: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, doc in zip(names, docs):
        for r in doc["results"]:
            if r["type"] == "perplexity" and r.get("domain") and "bits_per_byte" in r["metrics"]:
                collected.setdefault(r["domain"], {}).setdefault(name, {}).setdefault(r["language"], []).append(
                    r["metrics"]["bits_per_byte"])
    return {domain: {name: {lang: sum(v) / len(v) for lang, v in by_lang.items()} for name, by_lang in models.items()}
            for domain, models in sorted(collected.items())}


def build_report(docs: list[dict], names: list[str] | None = None, allocation: dict | None = None) -> dict:
    """Tables as data: one row per (task, metric, model) with per-language values and the two group averages."""
    names = names or [d["model"]["name"] for d in docs]
    if len(names) != len(docs):
        raise DeltaMoEError(f"--names gives {len(names)} names for {len(docs)} results")
    if len(set(names)) != len(names):
        raise DeltaMoEError(f"model names {names} are not unique; pass --names")
    original: list[str] = []
    new: list[str] = []
    for doc in docs:
        for lang in doc["languages"]["original"]:
            if lang in new:
                raise DeltaMoEError(f"{doc['_file']}: language {lang!r} is original here but new in another result")
            original += [lang] if lang not in original else []
        for lang in doc["languages"]["new"]:
            if lang in original:
                raise DeltaMoEError(f"{doc['_file']}: language {lang!r} is new here but original in another result")
            new += [lang] if lang not in new else []
    tasks: dict[str, str] = {}  # task name -> type, in first-seen order
    values: dict[tuple[str, str, str], dict[str, float]] = {}  # (task, metric, model) -> language -> value
    routing: dict[str, dict[str, list[list[float]]]] = {}
    for name, doc in zip(names, docs):
        for r in doc["results"]:
            tasks.setdefault(r["task"], r["type"])
            for metric, value in r["metrics"].items():
                values.setdefault((r["task"], metric, name), {})[r["language"]] = value
            if r["type"] == "routing" and "shares" in r["details"]:
                routing.setdefault(name, {})[r["language"]] = r["details"]["shares"]
    rows = []
    for task, ttype in tasks.items():
        metrics = list(dict.fromkeys(m for (t, m, _) in values if t == task))
        for metric in metrics:
            for name in names:
                per_lang = values.get((task, metric, name), {})
                rows.append({
                    "task": task, "type": ttype, "metric": metric, "model": name,
                    "lower_is_better": metric in LOWER_IS_BETTER, "per_language": per_lang,
                    "original_avg": _mean([per_lang[lang] for lang in original if lang in per_lang]),
                    "new_avg": _mean([per_lang[lang] for lang in new if lang in per_lang]),
                })
    suites = sorted({str(d.get("suite", {}).get("sha256")) for d in docs})
    allocated = None
    if allocation is not None:
        if not routing:
            raise DeltaMoEError("--expert-allocation-map given, but no result has routing shares (no MoE model with a "
                                "routing task)")
        allocated = {"map": allocation, "share": allocated_shares(routing, allocation)}
    return {"models": names, "languages": {"original": original, "new": new}, "tasks": tasks, "rows": rows,
            "domains": domain_table(docs, names), "noise": noise_rows(docs, names),
            "routing": routing, "allocation": allocated, "inputs": [{"name": n, "results": d["_file"], "model": d["model"].get("path"),
                                            "model_hashes": d["model"].get("hashes")} for n, d in zip(names, docs)],
            "suite_sha256": suites}


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


def report_markdown(report: dict) -> str:
    langs = report["languages"]["original"] + report["languages"]["new"]
    models = report["models"]
    summary = (f"Original languages: {', '.join(report['languages']['original']) or '–'}; "
               f"new languages: {', '.join(report['languages']['new']) or '–'}. "
               "Averages are means over languages; ↓ marks metrics where lower is better.")
    out = ["# DeltaMoE evaluation report", "", *([f"**{report['note']}**", ""] if report.get("note") else []), summary, ""]
    if len(report["suite_sha256"]) > 1:
        out += ["**Warning:** the results come from different suite files; averages may not be comparable.", ""]
    out += ["## Original vs new languages", "",
            "| task | metric | " + " | ".join(f"{m} orig | {m} new" for m in models) + " |",
            "|---|---|" + "---|---|" * len(models)]
    by_key: dict[tuple[str, str], dict[str, dict]] = {}
    for row in report["rows"]:
        by_key.setdefault((row["task"], row["metric"]), {})[row["model"]] = row
    for (task, metric), per_model in by_key.items():
        arrow = " ↓" if metric in LOWER_IS_BETTER else ""
        cells = " | ".join(f"{_fmt(per_model[m]['original_avg'])} | {_fmt(per_model[m]['new_avg'])}" for m in models)
        out.append(f"| {task} | {metric}{arrow} | {cells} |")
    out += ["", "## Per language", ""]
    for (task, metric), per_model in by_key.items():
        out += [f"### {task} — {metric}{' ↓' if metric in LOWER_IS_BETTER else ''}", "",
                "| model | " + " | ".join(langs) + " | original avg | new avg |", "|---|" + "---|" * (len(langs) + 2)]
        for m in models:
            row = per_model[m]
            cells = " | ".join(_fmt(row["per_language"].get(lang)) for lang in langs)
            out.append(f"| {m} | {cells} | {_fmt(row['original_avg'])} | {_fmt(row['new_avg'])} |")
        out.append("")
    if report.get("domains"):
        out += _domains_markdown(report)
    if report.get("noise"):
        out += _noise_markdown(report)
    if report.get("allocation"):
        out += _allocation_markdown(report["allocation"], langs)
    return "\n".join(out)


def _domains_markdown(report: dict) -> list[str]:
    domains = report["domains"]
    original, new = report["languages"]["original"], report["languages"]["new"]
    title = {"in": "in domain", "out": "out of domain"}
    columns = [(lang, d) for lang in original + new for d in domains]
    out = ["## Held-out text: in domain vs out of domain (bits per byte ↓)", "",
           "In domain: held-out passages of the training genres; out of domain: another genre that no stage trained "
           "on. A gain in domain only is the register of the training texts; a gain out of domain is the language.", "",
           "| model | " + " | ".join(f"{lang} {title.get(d, d)}" for lang, d in columns)
           + " | " + " | ".join(f"new avg {title.get(d, d)}" for d in domains) + " |",
           "|---|" + "---|" * (len(columns) + len(domains))]
    for m in report["models"]:
        cells = [_fmt(domains[d].get(m, {}).get(lang)) for lang, d in columns]
        avgs = [_fmt(_mean([domains[d][m][lang] for lang in new if lang in domains[d].get(m, {})])) for d in domains]
        out.append(f"| {m} | " + " | ".join(cells + avgs) + " |")
    return out + [""]


def _interval(lo: float, hi: float, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"[{f.format(lo)}, {f.format(hi)}]"


def _noise_markdown(report: dict) -> list[str]:
    rows = report["noise"]
    models = report["models"]
    reference = rows[0]["reference"]
    out = ["## Noise: bits per byte with 95% bootstrap intervals", "",
           f"Percentile bootstrap over examples ({rows[0]['resamples']} resamples, seed {rows[0]['seed']}); "
           f"Δ is each model minus {reference or 'the first model'} on the same examples, its interval from paired "
           "resamples: an interval that contains 0 is no measured effect.", "",
           "| task | language | n | " + " | ".join(models) + " | " + " | ".join(f"Δ {m}" for m in models if m != reference)
           + " |", "|---|---|---|" + "---|" * (len(models) * 2 - (reference is not None))]
    for row in rows:
        cells = []
        for m in models:
            e = row["models"].get(m)
            cells.append(f"{e['bits_per_byte']:.3f} {_interval(*e['interval'])}" if e else "–")
        for m in models:
            if m == reference:
                continue
            e = row["models"].get(m)
            cells.append(f"{e['difference']:+.3f} {_interval(*e['difference_interval'], signed=True)}"
                         if e and "difference" in e else "–")
        out.append(f"| {row['task']} | {row['language']} | {row['n']} | " + " | ".join(cells) + " |")
    return out + [""]


def _allocation_markdown(allocation: dict, langs: list[str]) -> list[str]:
    experts, shared = allocation["map"]["experts"], allocation["map"].get("shared_experts", [])
    langs = [lang for lang in langs if lang in experts]
    sets = ", ".join(f"{lang}: {sorted(set(experts[lang]) | set(shared))}" for lang in langs)
    out = ["## Routing on the allocated experts", "",
           f"Share of top-k choices on each language's allocated experts ({sets}), mean over layers, on untagged "
           "held-out text: 1.0 means the router alone keeps every language inside its experts. With E experts and "
           "top-k, a router that ignores language puts about |set|/E there.", "",
           "| model | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    for model, by_lang in allocation["share"].items():
        out.append(f"| {model} | " + " | ".join(_fmt(by_lang.get(lang)) for lang in langs) + " |")
    return out + [""]


def plot_bars(report: dict, task: str, metric: str, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    langs = report["languages"]["original"] + report["languages"]["new"]
    rows = {r["model"]: r for r in report["rows"] if r["task"] == task and r["metric"] == metric}
    models = report["models"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(langs) * max(1, len(models)) / 2), 3.2), dpi=100)
    x = np.arange(len(langs))
    for k, m in enumerate(models):
        vals = [rows[m]["per_language"].get(lang, np.nan) for lang in langs] if m in rows else [np.nan] * len(langs)
        ax.bar(x + (k - (len(models) - 1) / 2) * width, vals, width, label=m)
    ax.set_xticks(x, [f"{lang}\n({'orig' if lang in report['languages']['original'] else 'new'})" for lang in langs])
    ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    ax.set_title(f"{task}: {metric}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file)
    plt.close(fig)


def plot_routing(shares_by_lang: dict[str, list[list[float]]], model: str, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    langs = list(shares_by_lang)
    tables = {lang: np.array(shares_by_lang[lang]) for lang in langs}
    vmax = max(float(t.max()) for t in tables.values())  # colour range of the data, so small shifts are visible
    fig, axes = plt.subplots(1, len(langs), figsize=(2.8 * len(langs) + 1.2, 3.4), dpi=100, squeeze=False,
                             constrained_layout=True)
    for ax, lang in zip(axes[0], langs):
        table = tables[lang]
        image = ax.imshow(table, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(lang)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(table.shape[1]))
        ax.set_yticks(range(table.shape[0]))
        if table.size <= 128:
            for (layer, expert), value in np.ndenumerate(table):
                ax.text(expert, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 * vmax else "white")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of tokens")
    fig.suptitle(f"routing: {model} (top-k choices per token)")
    fig.savefig(file)
    plt.close(fig)


def plot_routing_compare(routing: dict[str, dict[str, list[list[float]]]], file: Path) -> None:
    """Several MoE models' routing side by side: one row per model, one column per language, one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(routing)
    langs = list(dict.fromkeys(lang for by_lang in routing.values() for lang in by_lang))
    vmax = max(float(np.max(table)) for by_lang in routing.values() for table in by_lang.values())
    fig, axes = plt.subplots(len(models), len(langs), figsize=(2.6 * len(langs) + 1.2, 2.8 * len(models) + 0.6), dpi=100,
                             squeeze=False, constrained_layout=True)
    image = None
    for r, model in enumerate(models):
        for c, lang in enumerate(langs):
            ax = axes[r][c]
            if lang not in routing[model]:
                ax.axis("off")
                continue
            table = np.array(routing[model][lang])
            image = ax.imshow(table, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
            ax.set_title(f"{model} · {lang}", fontsize=9)
            ax.set_xticks(range(table.shape[1]))
            ax.set_xlabel("expert" if r == len(models) - 1 else "")
            ax.set_ylabel("layer" if c == 0 else "")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="share of tokens")
    fig.suptitle("routing per language (top-k choices per token)")
    fig.savefig(file)
    plt.close(fig)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def write_report(out: Path, report: dict) -> list[Path]:
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    plots = out / "plots"
    plots.mkdir()
    written = []
    for task, ttype in report["tasks"].items():
        metric = PRIMARY_METRIC[ttype]
        if any(r["task"] == task and r["metric"] == metric for r in report["rows"]):
            written.append(plots / f"bars_{_slug(task)}_{metric}.png")
            plot_bars(report, task, metric, written[-1])
    for model, shares in report["routing"].items():
        written.append(plots / f"routing_{_slug(model)}.png")
        plot_routing(shares, model, written[-1])
    if len(report["routing"]) > 1:
        written.append(plots / "routing_compare.png")
        plot_routing_compare(report["routing"], written[-1])
    return written


def main(args: argparse.Namespace) -> int:
    check_output_dir(args.out, inputs=args.results, overwrite=args.overwrite)
    allocation = None
    if args.expert_allocation_map is not None:
        from deltamoe.megatron_ext.training.flags import read_allocation_map

        allocation = read_allocation_map(args.expert_allocation_map)
    report = build_report([load_results(p) for p in args.results], args.names, allocation)
    report["note"] = args.note
    with atomic_output_dir(args.out, inputs=args.results, overwrite=args.overwrite) as tmp:
        plots = write_report(tmp, report)
    print(f"wrote {args.out}/report.md, report.json and {len(plots)} plots")
    return 0
