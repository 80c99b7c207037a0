"""Log-likelihood scoring equals lm-evaluation-harness's HF backend, and bits per byte equals a hand computation.

lm-eval (`lm_eval.models.huggingface.HFLM`) runs here on the same local tiny model folder, offline: once at the
request level (our contexts, including few-shot ones, trailing spaces, an empty context, Cyrillic text and a context
longer than max_length) and once at the task level, with lm-eval task YAMLs that read the same local JSONL files
(ARC and Belebele prompt shapes), comparing per-choice log-likelihoods and acc / acc_norm.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deltamoe.evaluation.backends import HFBackend
from deltamoe.evaluation.suite import Suite, TaskSpec
from deltamoe.evaluation.tasks import multiple_choice, perplexity
from deltamoe.evaluation.tasks.common import load_examples
from tests.fixtures_eval import make_tiny_eval_model, write_jsonl

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parents[1] / "deltamoe" / "evaluation" / "examples"
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_eval_model(tmp_path_factory.mktemp("eval_loglik") / "llama", arch="llama", seed=3)


@pytest.fixture(scope="module")
def backend(model_dir) -> HFBackend:
    return HFBackend(model_dir, device="cpu", batch_size=3, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def hflm(model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), device="cpu", batch_size=1, dtype="float32", max_length=MAX_LENGTH)


def _suite(tasks: list[TaskSpec]) -> Suite:
    return Suite(name="t", original_languages=["en"], new_languages=["es", "ru"], tasks=tasks, max_length=MAX_LENGTH)


PAIRS = [
    ("Question: What is frozen water called?\nAnswer:", " ice"),
    ("The cat sleeps on the ", "warm mat"),  # trailing space moves into the continuation
    ("", "El gato duerme."),  # empty context: conditioned on BOS
    ("Столица Франции —", " Париж."),
    ("Question: " + "The sun rises in the east and sets in the west. " * 4 + "\nAnswer:", " yes"),  # > max_length
]


def test_loglikelihood_requests_match_lm_eval(backend, hflm):
    from lm_eval.api.instance import Instance

    ours = backend.loglikelihood(PAIRS)
    ctx_long, _ = backend.encode_pair(*PAIRS[-1])
    assert len(ctx_long) > MAX_LENGTH  # the truncation path is exercised
    theirs = hflm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)])
    for (lp, greedy), (lp_ref, greedy_ref) in zip(ours, theirs):
        torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-4)
        assert greedy == greedy_ref


def test_encode_pair_matches_lm_eval(backend, hflm):
    for context, continuation in PAIRS[:2] + PAIRS[3:]:
        assert backend.encode_pair(context, continuation) == hflm._encode_pair(context, continuation)


def test_loglikelihood_equals_independent_forward(backend, model_dir):
    """A plain computation written here: one unbatched forward of context+continuation ids."""
    context, continuation = "The cat sleeps on the ", "warm mat"
    tok = backend.tokenizer
    whole = tok.encode("The cat sleeps on the" + " warm mat")
    ctx = tok.encode("The cat sleeps on the")
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logits = backend.model(input_ids=torch.tensor([whole])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    expected = sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
    (lp, _), = backend.loglikelihood([(context, continuation)])
    assert math.isclose(lp, expected, rel_tol=1e-5, abs_tol=1e-4)


def test_bits_per_byte_by_hand(backend, tmp_path):
    text = "Кот спит."  # 9 characters, 16 UTF-8 bytes
    assert len(text.encode("utf-8")) == 16
    spec = TaskSpec(type="perplexity", language="ru", data=write_jsonl(tmp_path / "t.jsonl", [{"text": text}]))
    result = perplexity.evaluate(spec, backend, _suite([spec]))
    ids = [backend.tokenizer.bos_token_id] + backend.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) <= MAX_LENGTH  # one window
    with torch.no_grad():
        logprobs = backend.model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    total = sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids)))
    assert math.isclose(result["metrics"]["bits_per_byte"], -total / (math.log(2) * 16), rel_tol=1e-5)
    assert math.isclose(result["metrics"]["token_perplexity"], math.exp(-total / (len(ids) - 1)), rel_tol=1e-5)
    assert result["details"]["total_bytes"] == 16


def test_rolling_windows_match_lm_eval(backend, model_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    # add_bos_token=False: lm-eval then encodes the text without BOS, as we do (else it scores p(BOS | BOS) too).
    hflm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=1, dtype="float32", max_length=MAX_LENGTH,
                add_bos_token=False)

    text = " ".join(["El sol sale por el este y se pone por el oeste."] * 5)  # 3 windows, the last one short
    windows = backend.rolling_windows(text)
    assert len(windows) > 2 and len(windows[-1][1]) < MAX_LENGTH
    assert len(windows[-1][0]) + len(windows[-1][1]) == MAX_LENGTH + 1  # the short last window gets more context
    assert sum(len(c) for _, c in windows) == len(backend.tokenizer.encode(text, add_special_tokens=False))
    ours = sum(lp for lp, _ in backend.loglikelihood_tokens(windows))
    (theirs,) = hflm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-3)


def _lm_eval_task_yaml(folder: Path) -> None:
    arc = f"""task: dm_arc_es
dataset_path: json
dataset_kwargs:
  data_files:
    test: {EXAMPLES / 'arc_es.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    belebele = f"""task: dm_belebele_es
dataset_path: json
dataset_kwargs:
  data_files:
    test: {EXAMPLES / 'belebele_es.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "P: {{{{passage}}}}\\nQ: {{{{question.strip()}}}}\\nA: {{{{choices[0]}}}}\\nB: {{{{choices[1]}}}}\\nC: {{{{choices[2]}}}}\\nD: {{{{choices[3]}}}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: ["A", "B", "C", "D"]
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    (folder / "dm_arc_es.yaml").write_text(arc)
    (folder / "dm_belebele_es.yaml").write_text(belebele)


def test_multiple_choice_task_matches_lm_eval(backend, hflm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _lm_eval_task_yaml(tmp_path)
    out = simple_evaluate(model=hflm, tasks=["dm_arc_es", "dm_belebele_es"], num_fewshot=0, log_samples=True,
                          task_manager=TaskManager(include_path=str(tmp_path)))
    for fmt, name in (("arc", "dm_arc_es"), ("belebele", "dm_belebele_es")):
        spec = TaskSpec(type="multiple_choice", format=fmt, language="es", data=EXAMPLES / f"{name[3:]}.jsonl")
        ours = multiple_choice.evaluate(spec, backend, _suite([spec]))
        theirs = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        assert len(theirs) == ours["num_examples"]
        for mine, ref in zip(ours["samples"], theirs):
            torch.testing.assert_close(mine["loglikelihoods"], [r[0][0] for r in ref["resps"]], rtol=1e-5, atol=1e-4)
            assert mine["context"] == ref["arguments"][0][0]
            assert (mine["acc"], mine["acc_norm"]) == (ref["acc"], ref["acc_norm"])
        assert ours["metrics"]["acc"] == pytest.approx(out["results"][name]["acc,none"])
        assert ours["metrics"]["acc_norm"] == pytest.approx(out["results"][name]["acc_norm,none"])


def test_fewshot_contexts_are_deterministic_and_exclude_the_example(backend, hflm, tmp_path):
    from lm_eval.api.instance import Instance

    spec = TaskSpec(type="multiple_choice", format="arc", language="en", data=EXAMPLES / "arc_en.jsonl", num_fewshot=2)
    suite = _suite([spec])
    first = multiple_choice.evaluate(spec, backend, suite)
    again = multiple_choice.evaluate(spec, backend, suite)
    assert [s["loglikelihoods"] for s in first["samples"]] == [s["loglikelihoods"] for s in again["samples"]]
    for sample, record in zip(first["samples"], load_examples(spec, multiple_choice.REQUIRED)[0]):
        question = record["question"]
        assert sample["context"].count("Question:") == 3
        assert sample["context"].count(question) == 1  # the example never appears as its own shot
    # The few-shot contexts score the same through lm-eval.
    examples, pool = load_examples(spec, multiple_choice.REQUIRED)
    context = multiple_choice.build_context(spec, suite, pool, examples[0])
    assert context == first["samples"][0]["context"]
    choices = ["water and carbon dioxide", "sand", "salt", "plastic"]
    theirs = hflm.loglikelihood([Instance("loglikelihood", {}, (context, " " + c), i) for i, c in enumerate(choices)])
    torch.testing.assert_close(first["samples"][0]["loglikelihoods"], [t[0] for t in theirs], rtol=1e-5, atol=1e-4)
