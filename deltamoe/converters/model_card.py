"""Model cards: the README.md that `export`, `graft` and `merge` write into every Hugging Face folder they make.

The card follows the Hub's format (https://huggingface.co/docs/hub/model-cards): YAML front matter, then Markdown.
- `base_model` names the models this one was made from (a Hub id when one is known: a plain `org/name`, a
  Hugging Face cache folder `models--org--name/snapshots/...`, or `_name_or_path` in config.json; otherwise the local
  folder's name, and the body says so), and `base_model_relation` says how, with the Hub's documented values:
  `finetune` for an exported trained checkpoint (upcycling plus continued pre-training), `merge` for a graft
  (M + (I - B) combines the MoE with the post-trained model) and for the dense merges.
- `license` (and `license_name` / `license_link`) is the base model's, read from the base folder's README.md front
  matter; when it has none, the field is omitted and the body says why.
- `language`: the base card's languages plus every language the training data was tagged with.
- `library_name: transformers`, `pipeline_tag: text-generation`, tags `deltamoe` (and `moe`, the HF format,
  `mergekit`-style `merge` for merges).
The body says how the model was made, from the files DeltaMoE writes next to the weights: the upcycle plan
(`deltamoe_upcycle.json`), the training record (`deltamoe_training.json`: stages, data, iterations x global batch x
sequence length, tokens per language from the trainer's per-language log), the graft manifest (Δ source and scale)
or the merge manifest (method, weights). The pipeline adds the evaluation table once it has one (`add_evaluation`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

CARD_FILE = "README.md"
EVAL_BEGIN, EVAL_END = "<!-- deltamoe:evaluation -->", "<!-- /deltamoe:evaluation -->"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FORMAT_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "llama": "Llama",
                "qwen2": "Qwen2", "qwen3": "Qwen3"}
STAGE_WHAT = {0: "every parameter (dense continued pre-training)", 1: "new experts and routers (original experts frozen)",
              2: "routers only (review)"}


# ---- reading what the inputs say --------------------------------------------------------------------------------------
def front_matter(folder: str | os.PathLike | None) -> dict:
    """The YAML front matter of a folder's README.md ({} when there is none or it does not parse)."""
    if folder is None:
        return {}
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def hub_id(model: str | os.PathLike | None) -> str | None:
    """The Hugging Face Hub id of a model given as an id or a local folder, when it can be known offline."""
    if model is None:
        return None
    text = str(model)
    if not Path(text).exists() and _HUB_ID.fullmatch(text):
        return text
    for part in Path(text).parts:  # huggingface_hub's cache: .../models--org--name/snapshots/<revision>
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:])
    config = Path(text) / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text()).get("_name_or_path") or ""
        except json.JSONDecodeError:
            name = ""
        if _HUB_ID.fullmatch(name) and not Path(name).exists():
            return name
    return None


def _model_ref(model: str | os.PathLike) -> tuple[str, bool]:
    """(what base_model lists, whether it is a Hub id)."""
    found = hub_id(model)
    return (found, True) if found else (Path(str(model)).name, False)


def _license(base: str | os.PathLike | None) -> tuple[dict, str]:
    """(front-matter license fields, a sentence for the body) from the base model's card."""
    meta = front_matter(base) if base is not None and Path(str(base)).exists() else {}
    fields = {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}
    if fields:
        return fields, f"`{fields['license']}`, the base model's license (from its model card)."
    where = f"{base}/{CARD_FILE}" if base is not None else "the base model"
    return {}, (f"not stated: {where} has no `license` field, so this card names none. Add the base model's "
                f"license before publishing this model.")


def _languages(*lists) -> list[str]:
    out: list[str] = []
    for values in lists:
        if isinstance(values, str):
            values = [values]
        for v in values or []:
            if isinstance(v, str) and v and v not in out:
                out.append(v)
    return out


# ---- the training record ----------------------------------------------------------------------------------------------
def _measured_tokens(stage: dict) -> dict[str, int] | None:
    """Tokens per language the trainer counted (its per-language JSONL log) up to the completed iteration."""
    log = stage.get("routing_log_file")
    if not log or not Path(log).is_file():
        return None
    last = stage.get("iterations")
    by_iteration: dict[int, dict] = {}
    for line in Path(log).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        # A run killed after logging but before saving logs those iterations again when it resumes: keep the last.
        if isinstance(row, dict) and (last is None or row.get("iteration", 0) <= last):
            by_iteration[row["iteration"]] = row
    totals: dict[str, int] = {}
    for row in by_iteration.values():
        for lang, n in row.get("tokens", {}).items():
            totals[lang] = totals.get(lang, 0) + int(n)
    return totals or None


def training_stages(megatron_dir: str | os.PathLike) -> list[dict]:
    """The trainer's record of a Megatron folder, completed iterations and measured tokens filled in."""
    from deltamoe.megatron_ext.training.record import stages_with_iterations

    stages = []
    for stage in stages_with_iterations(megatron_dir):
        stage = dict(stage)
        if stage.get("measured_tokens") is None:
            stage["measured_tokens"] = _measured_tokens(stage)
        stages.append(stage)
    return stages


def _stage_tokens(stage: dict) -> int | None:
    it = stage.get("iterations")
    if it is None or not stage.get("global_batch_size") or not stage.get("seq_length"):
        return None
    return it * stage["global_batch_size"] * stage["seq_length"]


def _training_section(stages: list[dict]) -> list[str]:
    if not stages:
        return ["No DeltaMoE training record: this checkpoint was not trained by `deltamoe train` (or predates the "
                "record), so no training stage is listed."]
    lines = ["| stage | trains | iterations | global batch x sequence | tokens | data (language, blend weight, dataset "
             "tokens) | tokens per language (trainer's count) |", "|---|---|---|---|---|---|---|"]
    for s in stages:
        tokens = _stage_tokens(s)
        it = s.get("iterations")
        data = "<br>".join(f"`{Path(d['prefix']).name}` ({d['language']}, {d['weight']:g}, {d['num_tokens']:,})"
                           for d in s.get("data", []))
        measured = s.get("measured_tokens")
        measured_text = ", ".join(f"{k} {v:,}" for k, v in measured.items() if v) if measured else "–"
        lines.append(f"| {s['stage']} | {STAGE_WHAT.get(s['stage'], '?')} | "
                     f"{it if it is not None else '?'} of {s.get('train_iters')} | "
                     f"{s.get('global_batch_size')} x {s.get('seq_length')} | "
                     f"{f'{tokens:,}' if tokens is not None else '?'} | {data} | {measured_text} |")
    lines.append("")
    lines.append("Tokens = iterations x global batch x sequence length (Megatron's packed sequences).")
    for s in stages:
        settings = [f"lr {s.get('lr')} ({s.get('lr_decay_style')})"]
        if s.get("original_languages"):
            settings.append(f"original languages {', '.join(s['original_languages'])}")
        if s.get("lpr_loss_coeff"):
            settings.append(f"language-prior loss γ = {s['lpr_loss_coeff']}")
        if s.get("moe_aux_loss_coeff"):
            settings.append(f"load-balancing loss {s['moe_aux_loss_coeff']}")
        if s.get("expert_allocation") and s["expert_allocation"] != "learned":
            settings.append(f"experts allocated {s['expert_allocation']} (allocation loss {s.get('allocation_loss_coeff')})")
        p = s.get("parallel") or {}
        if p:
            n = p.get("world_size")
            settings.append(f"{n} process{'es' if n != 1 else ''} (TP {p.get('tensor')}, PP {p.get('pipeline')}, "
                            f"EP {p.get('expert')})")
        lines.append(f"- stage {s['stage']}: " + "; ".join(settings))
    return lines


def _read_plan(folder: Path) -> dict | None:
    """deltamoe_upcycle.json of an upcycled MoE folder; None for a dense one."""
    from deltamoe.megatron_ext.moe.plan import PLAN_FILE

    path = folder / PLAN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _upcycle_section(plan: dict | None) -> list[str]:
    if plan is None:
        return []
    variant = {"copy": "every expert starts as a copy of the dense FFN (MoE-LPR)",
               "shared": "the dense FFN becomes an always-on shared expert, routed experts are its slices"}
    lines = [f"- {plan['num_experts']} routed experts, top-{plan['topk']} (softmax, then top-k, renormalised), "
             f"variant `{plan['variant']}`: {variant.get(plan['variant'], '')}",
             f"- frozen experts (the original FFN, never trained): {plan.get('frozen_experts')}",
             f"- router init `{plan.get('router_init')}`, noise std {plan.get('noise_std')}, seed {plan.get('seed')}"]
    if plan.get("granularity", 1) != 1:
        lines.append(f"- granularity {plan['granularity']} (each expert is 1/{plan['granularity']} of the FFN)")
    return lines


def _front(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _write(folder: Path, meta: dict, body: list[str]) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(_front(meta) + "\n" + "\n".join(body).rstrip() + "\n", encoding="utf-8")
    return path


def _relation_note(refs: list[tuple[str, bool]]) -> list[str]:
    local = [name for name, is_hub in refs if not is_hub]
    if not local:
        return []
    return [f"`base_model` lists local folder names ({', '.join(f'`{n}`' for n in local)}): no Hugging Face Hub id was "
            f"found for them. Replace them with the Hub ids before publishing."]


# ---- the three writers ------------------------------------------------------------------------------------------------
def write_export_card(out: str | os.PathLike, *, name: str, megatron_dir: str | os.PathLike, meta, hf_format: str,
                      routing: list[str] | None = None) -> Path:
    """README.md of `deltamoe export` into `out` (the model `name`), plus the training record it summarises."""
    from deltamoe.megatron_ext.training.record import RECORD_FILE

    out, megatron_dir = Path(out), Path(megatron_dir)
    source = meta.source or {}
    base = source.get("hf") or (source.get("dense_source") or {}).get("hf")
    stages = training_stages(megatron_dir)
    if stages:
        (out / RECORD_FILE).write_text(json.dumps({"stages": stages}, indent=2) + "\n")
    plan = _read_plan(megatron_dir)
    upcycle_lines, is_moe = _upcycle_section(plan), plan is not None
    ref = _model_ref(base) if base else (Path(megatron_dir).name, False)
    license_fields, license_text = _license(base)
    base_meta = front_matter(base) if base and Path(base).exists() else {}
    languages = _languages(base_meta.get("language"), *[s.get("languages") for s in stages])
    card = {"base_model": ref[0]}
    if stages:
        card["base_model_relation"] = "finetune"
    card.update(license_fields)
    if languages:
        card["language"] = languages
    card.update(library_name="transformers", pipeline_tag="text-generation",
                tags=_languages(["deltamoe"], ["moe", "upcycled"] if is_moe else [], [hf_format],
                                ["continued-pretraining"] if stages else []))
    label = FORMAT_NAMES.get(hf_format, hf_format)
    kind = f"a {label} mixture of experts" if is_moe else f"a dense {label} model"
    body = [f"# {name}", "",
            f"{kind[0].upper() + kind[1:]} made with DeltaMoE from `{ref[0]}`, exported from the Megatron checkpoint "
            f"`{megatron_dir}`.", ""]
    if is_moe:
        body += ["## Upcycling", "", "Every FFN of the dense model became a mixture of experts; at step 0 the MoE "
                 "computes exactly the dense model's function.", "", *upcycle_lines, ""]
    if routing:
        body += ["## Routing", "", *routing, ""]
    body += ["## Training", "", *_training_section(stages), ""]
    body += ["## License", "", license_text, ""]
    body += _relation_note([ref])
    return _write(out, card, body)


def write_graft_card(out: str | os.PathLike, manifest: dict, *, name: str, base, post, moe) -> Path:
    """README.md of `deltamoe graft` into `out` (the model `name`): the MoE's making and the grafted Δ = I - B."""
    from deltamoe.megatron_ext.training.record import RECORD_FILE, read_training_record

    out, base, post, moe = Path(out), Path(base), Path(post), Path(moe)
    stages = read_training_record(moe)
    if stages:
        (out / RECORD_FILE).write_text(json.dumps({"stages": stages}, indent=2) + "\n")
    refs = [_model_ref(base), _model_ref(post)]
    license_fields, license_text = _license(base)
    post_license = front_matter(post).get("license")
    if post_license and post_license != license_fields.get("license"):
        license_text += f" The post-trained model `{refs[1][0]}` states `{post_license}`: its terms apply too."
    languages = _languages(front_matter(base).get("language"), front_matter(post).get("language"),
                           front_matter(moe).get("language"), *[s.get("languages") for s in stages])
    card = {"base_model": [r[0] for r in refs], "base_model_relation": "merge", **license_fields}
    if languages:
        card["language"] = languages
    card.update(library_name="transformers", pipeline_tag="text-generation",
                tags=["deltamoe", "moe", "upcycled", "graft", manifest["format"]])
    plan = _read_plan(moe) or {}
    upcycle_lines, shared = _upcycle_section(plan), plan.get("shared_expert") is not None
    experts = {"all": "every routed expert" + (" and the shared expert" if shared else ""),
               "original": "the frozen, original experts only" + (" and the shared expert" if shared else ""),
               "new": "the new experts only"}[manifest["experts"]]
    check = manifest.get("base_check")
    trained = (f"and trained on {', '.join(_languages(*[s.get('languages') for s in stages]))} text"
               if stages else "(not trained: no training record)")
    body = [f"# {name}", "",
            f"A {FORMAT_NAMES.get(manifest['format'], manifest['format'])} mixture of experts made with DeltaMoE: the "
            f"MoE `{moe.name}`, upcycled from `{refs[0][0]}` {trained}, with the post-training delta of `{refs[1][0]}` "
            f"grafted into its experts (DeltaMoE: instruction following carried into the new languages without "
            f"alignment training).", "",
            "## Graft", "",
            f"- Δ = I − B per tensor, with I = `{post}` and B = `{base}`; scale α = {manifest['scale']}",
            f"- experts that received α·Δ (sliced as the upcycle plan made them): {experts}; attention, norms, "
            f"embeddings and lm_head received α·Δ too; routers unchanged",
            f"- {manifest['tensors']['grafted']} tensors grafted, {manifest['tensors']['unchanged']} unchanged",
            f"- tokenizer and chat template from I; vocabulary policy: {manifest['vocab_policy']}"]
    if check:
        body.append(f"- check that the MoE was upcycled from B: "
                    f"{check if isinstance(check, str) else json.dumps(check, sort_keys=True)}")
    body += ["", "Details: `deltamoe_graft.json` (inputs with sha256, versions).", ""]
    if upcycle_lines:
        body += ["## Upcycling", "", *upcycle_lines, ""]
    body += ["## Routing", "", *(_card_section(moe, "Routing") or
                                 ["Inference routes every token by the router alone (no language tag is read)."]), ""]
    body += ["## Training", "", *_training_section(stages), ""]
    body += ["## License", "", license_text, ""]
    body += _relation_note(refs)
    return _write(out, card, body)


def write_merge_card(out: str | os.PathLike, manifest: dict, *, name: str) -> Path:
    """README.md of `deltamoe merge` into `out` (the model `name`): method, weights, the models and the base."""
    from deltamoe.megatron_ext.training.record import RECORD_FILE, read_training_record

    out = Path(out)
    base = Path(manifest["inputs"]["base"]["path"])
    models = [Path(m["path"]) for m in manifest["inputs"]["models"]]
    refs = [_model_ref(base)] + [_model_ref(m) for m in models]
    unique = list(dict.fromkeys(r[0] for r in refs))
    license_fields, license_text = _license(base)
    trained = {m.name: read_training_record(m) for m in models}
    languages = _languages(*[front_matter(m).get("language") for m in (base, *models)],
                           *[s.get("languages") for stages in trained.values() for s in stages])
    card = {"base_model": unique, "base_model_relation": "merge", **license_fields}
    if languages:
        card["language"] = languages
    card.update(library_name="transformers", pipeline_tag="text-generation", tags=["deltamoe", "merge", manifest["method"]])
    method = manifest["method"]
    body = [f"# {name}", "", f"A dense model merged with DeltaMoE's `{method}` from the models below "
            f"(task vectors τ_k = M_k − base, tensor by tensor, in float32).", "", "## Merge", "",
            f"- method: `{method}`" + (" (the first model plus the later models' deltas: M_1 + Σ w_k τ_k)"
                                       if method == "param_delta" else ""),
            f"- base: `{refs[0][0]}` (`{base}`)", "- models and weights:"]
    for (name, _), m, w in zip(refs[1:], models, manifest["weights"]):
        body.append(f"  - `{name}` (`{m}`): weight {w}")
    if method in ("ties", "dare_linear", "dare_ties"):
        body.append(f"- density {manifest['density']}, seed {manifest['seed']}")
    body += [f"- tokenizer from `{manifest['tokenizer_from']}`; vocabulary policy: {manifest['vocab_policy']}", "",
             "Details: `deltamoe_merge.json` (inputs with sha256, versions).", ""]
    for name, stages in trained.items():
        if stages:
            (out / RECORD_FILE).write_text(json.dumps({"stages": stages, "model": name}, indent=2) + "\n")
            body += [f"## Training of `{name}`", "", *_training_section(stages), ""]
    body += ["## License", "", license_text, ""]
    body += _relation_note(refs)
    return _write(out, card, body)


# ---- evaluation (added by the pipeline) -------------------------------------------------------------------------------
def _evaluation_section(results: dict, report: Path | None) -> list[str]:
    backend = results.get("backend", {})
    lines = [EVAL_BEGIN, "## Evaluation", "",
             f"DeltaMoE's offline suite `{results.get('suite', {}).get('content', {}).get('name', '?')}` "
             f"({backend.get('name')}, {backend.get('device')}, {backend.get('dtype')}; seed {results.get('seed')}).", "",
             "| task | language | examples | metrics |", "|---|---|---|---|"]
    for r in results.get("results", []):
        metrics = [f"{metric} {value:.4g}" for metric, value in (r.get("metrics") or {}).items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if metrics:
            lines.append(f"| {r['task']} | {r['language']} | {r.get('num_examples', '')} | {'; '.join(metrics)} |")
    if report is not None and report.exists():
        lines += ["", f"Comparison with the base, the post-trained model and the baselines: `{report}`."]
    lines.append(EVAL_END)
    return lines


def add_evaluation(folder: str | os.PathLike, results_json: str | os.PathLike, *, report: str | os.PathLike | None = None) -> Path:
    """Put (or replace) the evaluation table of `deltamoe eval`'s results.json into the folder's card."""
    path = Path(folder) / CARD_FILE
    text = path.read_text(encoding="utf-8")
    section = "\n".join(_evaluation_section(json.loads(Path(results_json).read_text()),
                                            Path(report) if report else None))
    if EVAL_BEGIN in text and EVAL_END in text:
        head, rest = text.split(EVAL_BEGIN, 1)
        text = head + section + rest.split(EVAL_END, 1)[1]
    else:
        marker = "\n## License"
        text = text.replace(marker, "\n" + section + "\n" + marker, 1) if marker in text else text.rstrip() + "\n\n" + section + "\n"
    tmp = path.with_name(f".{CARD_FILE}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _card_section(folder: Path, title: str) -> list[str]:
    """The lines of section `## title` of the model card in `folder` (empty when there is none)."""
    path = Path(folder) / "README.md"
    if not path.exists():
        return []
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == title
            continue
        if inside:
            lines.append(line)
    return [line for line in lines if line.strip()]
