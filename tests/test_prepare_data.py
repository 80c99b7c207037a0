"""`deltamoe prepare-data` and language-tagged blends, with a byte-level BPE tokenizer trained in-process."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import string
import subprocess

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

from deltamoe import cli
from deltamoe.common.errors import DeltaMoEError
from deltamoe.megatron_ext.data.blend import (
    build_language_tagged_datasets,
    gpt_dataset_config,
    load_language_blend,
    original_language_mask,
    parse_blend,
)
from deltamoe.megatron_ext.data.language_tag import read_language_tag
from deltamoe.megatron_ext.data.prepare import prepare_dataset

# English documents use only letters a-m, Spanish-tagged ones only n-z: a BPE token can never mix the two sets, so
# the letters of a decoded token tell which dataset it came from.
EN_LETTERS, ES_LETTERS = set("abcdefghijklm"), set("nopqrstuvwxyz")
EN_DOCS = [
    "a bad cab fed a calm hag.\nhe had a big jam.",
    "I am Jim. Ed had a deal. he came back.",
    "a cage had a black bag, a ham.",
    "me made a face. he damaged a blade.",
]
ES_DOCS = ["no son tu troy.", "sorry: ruso nos vuxt. sony stop.", "put your turn on rusty snout.", "opus runs to nov."]


def train_tokenizer(folder, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(EN_DOCS * 3 + ES_DOCS * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def read_indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    docs = []
    for a, b in zip(ds.document_indices[:-1], ds.document_indices[1:]):
        docs.append([int(t) for i in range(a, b) for t in ds[i]])
    return ds, docs


def write_text(path, docs, sep="\n\n"):
    path.write_text(sep.join(docs) + "\n")
    return path


# ---------------------------------------------------------------- prepare-data

def test_plain_text_round_trip_eod_and_sidecar(tmp_path, tok_dir, tokenizer):
    src = tmp_path / "en.txt"
    src.write_text("\n\n".join(EN_DOCS[:2]) + "\n\n   \n\n" + "\n\n".join(EN_DOCS[2:]) + "\n")
    tag = prepare_dataset(inputs=[src], tokenizer_dir=tok_dir, language="en", out_prefix=tmp_path / "out" / "en")

    ds, docs = read_indexed(tmp_path / "out" / "en")
    eos = tokenizer.eos_token_id
    assert eos == 1
    assert len(docs) == len(EN_DOCS)
    for doc_ids, text in zip(docs, EN_DOCS):
        assert doc_ids == tokenizer.encode(text, add_special_tokens=False) + [eos]
        assert tokenizer.decode(doc_ids[:-1]) == text
    assert all(d.count(eos) == 1 and d[-1] == eos for d in docs)  # EOD ends each document, nowhere else
    assert ds.index.dtype == np.uint16

    side = json.loads((tmp_path / "out" / "en.lang.json").read_text())
    assert side["language"] == "en" and side["format"] == "deltamoe.language-tag/1"
    assert side["tokenizer"]["vocab_size"] == len(tokenizer) == 300
    assert side["tokenizer"]["eod_id"] == eos
    assert side["num_documents"] == 4 == side["num_sequences"]
    assert side["num_tokens"] == sum(len(d) for d in docs)
    assert side["inputs"] == [{"path": str(src.resolve()), "sha256": hashlib.sha256(src.read_bytes()).hexdigest(), "num_documents": 4}]
    assert side["options"]["num_skipped_empty"] == 0  # the whitespace-only line sits inside one blank-line run
    assert read_language_tag(tmp_path / "out" / "en") == tag
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["en.bin", "en.idx", "en.lang.json"]


def test_jsonl_gz_line_mode_and_sentence_split(tmp_path, tok_dir, tokenizer):
    jsonl = tmp_path / "es.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        for doc in ES_DOCS:
            f.write(json.dumps({"body": doc, "id": 1}) + "\n\n")
    prepare_dataset(inputs=[jsonl], tokenizer_dir=tok_dir, language="es", out_prefix=tmp_path / "es", json_key="body")
    _, docs = read_indexed(tmp_path / "es")
    assert [tokenizer.decode(d[:-1]) for d in docs] == ES_DOCS

    lines = tmp_path / "lines.txt"
    lines.write_text("he had a bag.\n\nme made a face.\n")
    tag = prepare_dataset(inputs=[lines], tokenizer_dir=tok_dir, language="en", out_prefix=tmp_path / "lines", text_document="line")
    assert tag.num_documents == 2 and tag.options["num_skipped_empty"] == 1

    text = "I am Jim. Ed had a deal. he came back."
    split_src = write_text(tmp_path / "split.txt", [text])
    tag = prepare_dataset(inputs=[split_src], tokenizer_dir=tok_dir, language="en", out_prefix=tmp_path / "split", split_sentences=True)
    ds, docs = read_indexed(tmp_path / "split")
    assert tag.num_documents == 1 and tag.num_sequences == 3
    pieces = ["I am Jim.", " Ed had a deal.", " he came back."]
    assert [int(n) for n in ds.sequence_lengths] == [
        len(tokenizer.encode(p, add_special_tokens=False)) + (i == 2) for i, p in enumerate(pieces)
    ]
    assert tokenizer.decode(docs[0][:-1]) == text and docs[0][-1] == tokenizer.eos_token_id


def test_workers_write_the_same_bytes(tmp_path, tok_dir):
    src = write_text(tmp_path / "en.txt", EN_DOCS * 40)
    prepare_dataset(inputs=[src], tokenizer_dir=tok_dir, language="en", out_prefix=tmp_path / "one")
    prepare_dataset(inputs=[src], tokenizer_dir=tok_dir, language="en", out_prefix=tmp_path / "two", workers=2)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


def test_cli_runs_and_reports_errors(tmp_path, tok_dir, capsys):
    src = write_text(tmp_path / "en.txt", EN_DOCS)
    argv = ["prepare-data", "--input", str(src), "--tokenizer", str(tok_dir), "--lang", "en", "--out", str(tmp_path / "d")]
    assert cli.main(argv) == 0
    assert "4 documents" in capsys.readouterr().out
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert cli.main(argv + ["--overwrite", "--split-sentences"]) == 0
    assert read_language_tag(tmp_path / "d").options["split_sentences"] is True


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no documents"),
        ("whitespace", "no documents"),
        ("vocab", "has 300 tokens but --model-vocab-size has vocab_size 299"),
        ("model_dir", "has 300 tokens but model .* has vocab_size 256"),
        ("exists", "already exists: choose another --out or pass --overwrite"),
        ("bad_json", r"bad\.jsonl:2: not a JSON object"),
        ("missing_key", r"bad\.jsonl:1: no field 'text'"),
        ("lang", "is not a language code"),
        ("missing_input", "no such file"),
    ],
)
def test_bad_input_errors(tmp_path, tok_dir, case, message):
    good = write_text(tmp_path / "good.txt", EN_DOCS)
    inputs, kwargs = [good], {}
    if case == "empty":
        (tmp_path / "empty.txt").write_text("")
        inputs = [good, tmp_path / "empty.txt"]  # fails after the first file: nothing may be left behind
    elif case == "whitespace":
        inputs = [write_text(tmp_path / "ws.txt", ["  ", "\t"])]
    elif case == "vocab":
        kwargs["model_vocab_size"] = 299
    elif case == "model_dir":
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text(json.dumps({"vocab_size": 256}))
        kwargs["model_dir"] = tmp_path / "model"
    elif case == "exists":
        (tmp_path / "out.idx").write_bytes(b"x")
    elif case in ("bad_json", "missing_key"):
        lines = ['{"txt": "a"}', "{oops"] if case == "missing_key" else ['{"text": "a"}', "{oops"]
        (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
        inputs = [tmp_path / "bad.jsonl"]
    elif case == "lang":
        kwargs["language"] = "English"
    elif case == "missing_input":
        inputs = [tmp_path / "nope.txt"]
    kwargs.setdefault("language", "en")
    with pytest.raises(DeltaMoEError, match=message):
        prepare_dataset(inputs=inputs, tokenizer_dir=tok_dir, out_prefix=tmp_path / "out", **kwargs)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out")))
    assert leftovers == (["out.idx"] if case == "exists" else [])


def test_model_vocab_equal_to_tokenizer_is_accepted(tmp_path, tok_dir):
    src = write_text(tmp_path / "en.txt", EN_DOCS)
    tag = prepare_dataset(inputs=[src], tokenizer_dir=tok_dir, language="en", out_prefix=tmp_path / "d", model_vocab_size=300)
    assert tag.model_vocab_size == 300


# ---------------------------------------------------------------- blends

@pytest.fixture(scope="module")
def two_languages(tmp_path_factory, tok_dir):
    root = tmp_path_factory.mktemp("blend")
    en = write_text(root / "en.txt", EN_DOCS * 6)
    es = write_text(root / "es.txt", ES_DOCS * 6)
    prepare_dataset(inputs=[en], tokenizer_dir=tok_dir, language="en", out_prefix=root / "en")
    prepare_dataset(inputs=[es], tokenizer_dir=tok_dir, language="es", out_prefix=root / "es")
    return root


def letters(tokenizer, ids) -> set[str]:
    return {c for t in ids if t != tokenizer.eos_token_id for c in tokenizer.decode([t]).lower() if c in string.ascii_lowercase}


def test_language_tags_reach_the_original_language_mask(two_languages, tokenizer):
    blend = load_language_blend(["0.5", str(two_languages / "en"), "0.5", str(two_languages / "es")],
                                languages=["en", "es"], original_languages=["en"])
    assert blend.dataset_language_ids == [0, 1]
    config = gpt_dataset_config(blend, sequence_length=16, random_seed=1234)
    train, valid, test = build_language_tagged_datasets(blend, config, [40, 0, 0])
    assert valid is None and test is None and len(train) == 40
    seen = {0: 0, 1: 0}
    for i in range(len(train)):
        sample = train[i]
        lang = int(sample["lang_id"])
        assert int(sample["dataset_id"]) == lang  # blend order = declared order here
        # the sample's text really is that dataset's language ...
        expected, other = (EN_LETTERS, ES_LETTERS) if lang == 0 else (ES_LETTERS, EN_LETTERS)
        found = letters(tokenizer, sample["tokens"].tolist() + sample["labels"].tolist()[-1:])
        assert found & expected and not found & other, (i, lang, found)
        # ... and F(t) is 1 on every token of an English (original) sample, 0 on every Spanish one
        assert sample["original_language_mask"].shape == (16,)
        assert torch.equal(sample["original_language_mask"], torch.full((16,), 1.0 if lang == 0 else 0.0))
        seen[lang] += 1
    assert seen[0] >= 10 and seen[1] >= 10

    batch = torch.utils.data.default_collate([train[i] for i in range(8)])
    assert batch["original_language_mask"].shape == (8, 16) and batch["lang_id"].shape == (8,)
    rebuilt = original_language_mask(batch["lang_id"], blend.is_original_language(), batch["loss_mask"])
    assert torch.equal(rebuilt, batch["original_language_mask"])


def test_single_prefix_blend_and_eod_mask(two_languages):
    blend = load_language_blend([str(two_languages / "es")], original_languages=["en"])
    assert blend.languages == ("es", "en")  # undeclared: the blend's tags, then the original languages
    config = gpt_dataset_config(blend, sequence_length=16, random_seed=1, eod_mask_loss=True)
    (train, _, _) = build_language_tagged_datasets(blend, config, [5, None, None])
    sample = train[0]
    assert int(sample["dataset_id"]) == 0 and int(sample["lang_id"]) == 0
    assert not sample["original_language_mask"].any()
    blend_en = load_language_blend([str(two_languages / "en")], languages=["en"], original_languages=["en"])
    (train, _, _) = build_language_tagged_datasets(blend_en, gpt_dataset_config(blend_en, sequence_length=16, random_seed=1, eod_mask_loss=True), [5, None, None])
    for i in range(5):
        s = train[i]
        # F(t) follows the loss mask: EOD positions (masked by eod_mask_loss) leave the router loss too
        assert torch.equal(s["original_language_mask"], s["loss_mask"])
        assert (s["original_language_mask"][s["tokens"] == 1] == 0).all()


def test_blend_errors(two_languages, tmp_path):
    en, es = str(two_languages / "en"), str(two_languages / "es")
    with pytest.raises(DeltaMoEError, match=r"tagged with language 'es' .* declares only \['en', 'ru'\]"):
        load_language_blend([(1, en), (1, es)], languages=["en", "ru"], original_languages=["en"])
    with pytest.raises(DeltaMoEError, match="missing language tag sidecar"):
        load_language_blend([(1, en), (1, str(tmp_path / "nothing"))], languages=["en", "es"], original_languages=["en"])
    (tmp_path / "orphan.bin").write_bytes(b"")
    with pytest.raises(DeltaMoEError, match="exists but has no language tag"):
        load_language_blend([str(tmp_path / "orphan")], languages=["en"], original_languages=["en"])
    with pytest.raises(DeltaMoEError, match=r"original languages \['fr'\] are not among"):
        load_language_blend([en], languages=["en", "es"], original_languages=["fr"])
    with pytest.raises(DeltaMoEError, match=r"lists .*es as 'ru' but .*es.lang.json tags it 'es'"):
        load_language_blend([(1, en, "en"), (1, es, "ru")], original_languages=["en"])
    with pytest.raises(DeltaMoEError, match="must be a positive number"):
        parse_blend(["0", en])
    with pytest.raises(DeltaMoEError, match="sample count for every split"):
        blend = load_language_blend([(1, en), (1, es)], languages=["en", "es"], original_languages=["en"])
        build_language_tagged_datasets(blend, gpt_dataset_config(blend, sequence_length=8, random_seed=1), [4, None, None])


def test_blend_refuses_two_tokenizers(two_languages, tmp_path):
    other_tok = tmp_path / "tok2"
    train_tokenizer(other_tok, vocab_size=280)
    prepare_dataset(inputs=[write_text(tmp_path / "es.txt", ES_DOCS)], tokenizer_dir=other_tok, language="es", out_prefix=tmp_path / "es2")
    with pytest.raises(DeltaMoEError, match="tokenized differently"):
        load_language_blend([(1, str(two_languages / "en")), (1, str(tmp_path / "es2"))], languages=["en", "es"], original_languages=["en"])


def test_dataset_helper_compilation_is_disabled(monkeypatch):
    import megatron.core.datasets.utils as dataset_utils

    from deltamoe.megatron_ext.internals import (
        disable_dataset_helper_compilation,
    )

    monkeypatch.setattr(dataset_utils, "compile_helpers", dataset_utils.compile_helpers)  # restored after the test

    def no_make(*args, **kwargs):
        raise AssertionError(f"make must not run: {args}")

    monkeypatch.setattr(subprocess, "run", no_make)
    disable_dataset_helper_compilation()
    from megatron.core.datasets.utils import (
        compile_helpers,  # what megatron.training.initialize imports
    )

    compile_helpers()
