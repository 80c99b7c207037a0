"""Tiny tokenizers and models with tokenizers for the evaluation tests, built in-process (nothing downloaded).

The tokenizer is a byte-level BPE trained on a few hundred lines of English, Spanish and Russian text written here,
wrapped in transformers' PreTrainedTokenizerFast with BOS added like Llama's (so the lm-eval boundary rules about
special tokens are exercised) and a small chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_models import make_tiny_hf

VOCAB_SIZE = 384
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_EN = [
    "The cat sleeps on the warm mat near the door.", "A river runs through the green valley every spring.",
    "We read books in the library after school.", "The capital of France is Paris.",
    "Water boils at one hundred degrees.", "She bought bread, milk and apples at the market.",
    "The sun rises in the east and sets in the west.", "My brother plays the guitar on Sundays.",
    "Birds fly south when the winter comes.", "The train to London leaves at nine o'clock.",
]
_ES = [
    "El gato duerme sobre la alfombra cerca de la puerta.", "Un río corre por el valle verde cada primavera.",
    "Leemos libros en la biblioteca después de la escuela.", "La capital de Francia es París.",
    "El agua hierve a cien grados.", "Ella compró pan, leche y manzanas en el mercado.",
    "El sol sale por el este y se pone por el oeste.", "Mi hermano toca la guitarra los domingos.",
    "Los pájaros vuelan al sur cuando llega el invierno.", "El tren a Londres sale a las nueve.",
]
_RU = [
    "Кошка спит на тёплом коврике у двери.", "Река течёт через зелёную долину каждую весну.",
    "Мы читаем книги в библиотеке после школы.", "Столица Франции — Париж.",
    "Вода кипит при ста градусах.", "Она купила хлеб, молоко и яблоки на рынке.",
    "Солнце встаёт на востоке и садится на западе.", "Мой брат играет на гитаре по воскресеньям.",
    "Птицы летят на юг, когда приходит зима.", "Поезд в Лондон уходит в девять часов.",
]
TEXT = {"en": _EN, "es": _ES, "ru": _RU}


def training_lines() -> list[str]:
    lines = []
    for i in range(10):  # a few hundred lines: every sentence in several mixes
        for lang in ("en", "es", "ru"):
            lines += [s.lower() if i % 2 else s for s in TEXT[lang]]
        lines += [f"Question: {TEXT['en'][i]}\nAnswer: {TEXT['es'][i]}", f"English: {_EN[i]}\nSpanish: {_ES[i]}"]
    return lines


def make_tokenizer(folder: str | Path):
    """Train a byte-level BPE with exactly VOCAB_SIZE entries and save it as a transformers tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_lines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_tiny_eval_model(folder: str | Path, *, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny dense model from tests/tiny_models.py with the test tokenizer next to it."""
    folder = make_tiny_hf(arch, folder, seed=seed, vocab_size=VOCAB_SIZE)
    make_tokenizer(folder)
    return folder


def make_tiny_mixtral(folder: str | Path, *, seed: int = 0, num_experts: int = 4, top_k: int = 2) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts,
                           num_experts_per_tok=top_k, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0, tie_word_embeddings=False)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)  # large router weights so choices differ between tokens
    model.save_pretrained(folder)
    make_tokenizer(folder)
    return Path(folder)


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
