"""Translation scores equal sacrebleu's own, instruction constraints are checked as documented, and routing shares
on a tiny Mixtral equal a hand computation from the router logits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import sacrebleu
import torch

from deltamoe.evaluation.backends import HFBackend
from deltamoe.evaluation.data import read_records
from deltamoe.evaluation.suite import Suite, TaskSpec
from deltamoe.evaluation.tasks import instruction_following as ifeval
from deltamoe.evaluation.tasks import routing, translation
from tests.fixtures_eval import (
    TEXT,
    make_tiny_eval_model,
    make_tiny_mixtral,
    write_jsonl,
)

torch.set_num_threads(1)

HYPS = ["El gato duerme cerca de la puerta.", "El museo abre a diez.", "Los niños gustan cuentos", "río frío"]
REFS = ["El gato duerme cerca de la puerta.", "El museo abre a las diez.", "A los niños les gustan los cuentos.",
        "El río está frío en primavera."]


def _suite(tasks, **kw) -> Suite:
    return Suite(name="t", original_languages=["en"], new_languages=["es", "ru"], tasks=tasks,
                 language_names={"en": "English", "es": "Spanish"}, **kw)


def test_translation_scores_equal_sacrebleu():
    scores = translation.score_translations(HYPS, REFS)
    assert scores["chrf_pp"] == sacrebleu.corpus_chrf(HYPS, [REFS], word_order=2).score
    assert scores["chrf"] == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    assert scores["bleu"] == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert 0 < scores["bleu"] < scores["chrf_pp"] < 100  # a partial match, not a degenerate 0 or 100
    zh = translation.score_translations(["我爱猫"], ["我爱狗"], bleu_tokenize="zh")
    assert zh["bleu"] == sacrebleu.corpus_bleu(["我爱猫"], [["我爱狗"]], tokenize="zh").score


@pytest.fixture(scope="module")
def dense_backend(tmp_path_factory):
    folder = make_tiny_eval_model(tmp_path_factory.mktemp("eval_metrics") / "qwen2", arch="qwen2", seed=1)
    return HFBackend(folder, device="cpu", batch_size=4, max_length=128)


def test_translation_task_prompts_outputs_and_scores(dense_backend, tmp_path):
    data = tmp_path / "pairs.tsv"
    data.write_text("source\ttarget\n" + "".join(f"{e}\t{s}\n" for e, s in zip(TEXT["en"][:5], TEXT["es"][:5])))
    spec = TaskSpec(type="translation", source_language="en", language="es", data=data, num_fewshot=2, max_new_tokens=8)
    suite = _suite([spec])
    result = translation.evaluate(spec, dense_backend, suite)
    assert result["num_examples"] == 5
    hyps = [s["hypothesis"] for s in result["samples"]]
    assert all("\n" not in h for h in hyps)
    assert result["metrics"]["chrf_pp"] == sacrebleu.corpus_chrf(hyps, [TEXT["es"][:5]], word_order=2).score
    # The prompt: two other pairs as shots, then the source and "Spanish:".
    records = read_records(data, translation.REQUIRED)
    prompt = translation.build_prompt(spec, suite, records, records[0])
    assert prompt.endswith(f"English: {TEXT['en'][0]}\nSpanish:") and prompt.count("English:") == 3
    assert TEXT["es"][0] not in prompt
    # Greedy generation is deterministic: the same outputs one prompt at a time.
    one = [dense_backend.generate([p], max_new_tokens=8, stop=["\n"])[0].strip()
           for p in [translation.build_prompt(spec, suite, records, ex) for ex in records]]
    assert one == hyps


@pytest.mark.parametrize("constraint, response, expected", [
    ({"type": "max_words", "value": 5}, "one two three, four five.", True),
    ({"type": "max_words", "value": 4}, "one two three, four five.", False),
    ({"type": "min_words", "value": 3}, "Кошка спит у двери.", True),
    ({"type": "max_sentences", "value": 2}, "It rains. It pours! Does it stop?", False),
    ({"type": "min_sentences", "value": 3}, "It rains. It pours! Does it stop?", True),
    ({"type": "keywords", "words": ["river", "Paris"]}, "Paris has a river.", True),
    ({"type": "keywords", "words": ["river"]}, "Paris has rivers.", False),
    ({"type": "forbidden_words", "words": ["город"]}, "Москва — большой город.", False),
    ({"type": "format", "value": "json"}, '```json\n{"ciudad": "Madrid"}\n```', True),
    ({"type": "format", "value": "json"}, "ciudad: Madrid", False),
    ({"type": "format", "value": "bullets", "count": 2}, "* red\n- blue\n", True),
    ({"type": "format", "value": "bullets", "count": 3}, "* red\n- blue\n", False),
    ({"type": "format", "value": "lowercase"}, "madrid es grande", True),
    ({"type": "language", "value": "ru"}, "Море синее и тёплое.", True),
    ({"type": "language", "value": "ru"}, "The sea is blue.", False),
    ({"type": "language", "value": "es", "words": ["el", "mar"]}, "El mar es azul.", True),
    ({"type": "language", "value": "es", "words": ["el", "mar"]}, "The sea is blue.", False),
])
def test_instruction_constraints(constraint, response, expected):
    ifeval.validate_constraint("x", constraint)
    assert ifeval.check_constraint(constraint, response) is expected


def test_instruction_following_task_with_chat_template(dense_backend, tmp_path):
    data = write_jsonl(tmp_path / "if.jsonl", [
        {"prompt": "Say something.", "constraints": [{"type": "max_words", "value": 1000}, {"type": "min_words", "value": 1000}]},
        {"prompt": "Say more.", "constraints": [{"type": "max_sentences", "value": 1000}]},
    ])
    spec = TaskSpec(type="instruction_following", language="en", data=data, chat_template=True, max_new_tokens=6)
    result = ifeval.evaluate(spec, dense_backend, _suite([spec]))
    # max_words/max_sentences 1000 hold for any 6-token response and min_words 1000 never does.
    assert result["metrics"] == {"prompt_level_acc": 0.5, "instruction_level_acc": 2 / 3}
    assert [s["checks"] for s in result["samples"]] == [[True, False], [True]]


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    return make_tiny_mixtral(tmp_path_factory.mktemp("eval_routing") / "mixtral", seed=7, num_experts=4, top_k=2)


def test_routing_shares_match_router_logits(mixtral_dir, tmp_path):
    backend = HFBackend(mixtral_dir, device="cpu", batch_size=2, max_length=64)  # 3 texts -> a padded batch
    texts = TEXT["ru"][:3]
    spec = TaskSpec(type="routing", language="ru", data=write_jsonl(tmp_path / "ru.jsonl", [{"text": t} for t in texts]))
    result = routing.evaluate(spec, backend, _suite([spec]))
    shares = torch.tensor(result["details"]["shares"], dtype=torch.float64)
    assert shares.shape == (2, 4)
    torch.testing.assert_close(shares.sum(dim=1), torch.ones(2, dtype=torch.float64))

    # Hand computation: each text alone (no padding), router logits from output_router_logits, top-2 of softmax.
    counts = torch.zeros(2, 4, dtype=torch.float64)
    tokens = 0
    tok = backend.tokenizer
    for text in texts:
        ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            out = backend.model(input_ids=torch.tensor([ids]), output_router_logits=True)
        assert len(out.router_logits) == 2
        for layer, logits in enumerate(out.router_logits):
            chosen = logits.softmax(-1).topk(2, dim=-1).indices[1:]  # drop the BOS position
            for e in range(4):
                counts[layer, e] += (chosen == e).sum()
        tokens += len(ids) - 1
    expected = counts / (tokens * 2)
    torch.testing.assert_close(shares, expected)
    assert result["details"]["num_tokens"] == tokens
    assert (expected > 0).sum() > 4  # choices are spread, so the check is not trivially uniform
    for e in range(4):
        assert math.isclose(result["metrics"][f"expert_{e}_share"], expected[:, e].mean().item(), rel_tol=1e-9)


def test_routing_on_dense_model_is_marked_not_applicable(dense_backend, tmp_path):
    spec = TaskSpec(type="routing", language="en", data=write_jsonl(tmp_path / "en.jsonl", [{"text": "The cat."}]))
    result = routing.evaluate(spec, dense_backend, _suite([spec]))
    assert result["metrics"] == {}
    assert "no MoE routers" in result["details"]["not_applicable"]


def test_qa_loglik_with_chat_template(dense_backend, tmp_path):
    from deltamoe.evaluation.tasks import qa_loglik

    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "¿Cuál es la capital de Francia?", "answer": "París."}])
    spec = TaskSpec(type="qa_loglik", language="es", data=data, chat_template=True)
    result = qa_loglik.evaluate(spec, dense_backend, _suite([spec]))
    tok = dense_backend.tokenizer
    context = "<s><|user|>\n¿Cuál es la capital de Francia?\n<|assistant|>"  # the trailing "\n" moves to the answer
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + "\nParís.", add_special_tokens=False)
    assert ctx[0] == tok.bos_token_id and ctx[1] != tok.bos_token_id  # one BOS, from the template
    with torch.no_grad():
        logprobs = dense_backend.model(input_ids=torch.tensor([whole])).logits[0].double().log_softmax(-1)
    expected = sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
    assert math.isclose(result["metrics"]["loglik"], expected, rel_tol=1e-5)
    assert math.isclose(result["metrics"]["bits_per_byte"], -expected / (math.log(2) * len("París.".encode())), rel_tol=1e-5)
