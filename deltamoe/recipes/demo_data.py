"""The demo's data files, built from the unpacked Debian packages into `<cache>/demo-data/`.

Files (JSONL, UTF-8, one object per line) and their fields:

| file | fields | from |
|---|---|---|
| `{lang}-{source}.{train,heldout}.jsonl` | text, lang, source, id | Bible passages of 8 verse slots; fortunes |
| `{en,es,ru}-manual.ood.jsonl` | text, lang, source, id | aptitude's user manual: out-of-domain text, never trained on |
| `translation.en-es.heldout.jsonl` | id, source, target, source_lang, target_lang | KJV ↔ Reina-Valera 1909 verses |
| `faq-qa.{en,ru}.heldout.jsonl` | id (section number), question, answer, lang | Debian FAQ, held-out sections |
| `faq-sft.en.train.jsonl` | id, prompt, response, lang | Debian FAQ, the other sections (English) |
| `capitals-mc.en.jsonl` | id, question, choices (4), gold (index of the answer), lang | bsdgames quiz: country → capital |
| `demo_suite.yaml` | the evaluation suite over these files (a copy of deltamoe/recipes/demo_suite.yaml) | |
| `manifest.json` | counts, split rule, source sha256 | |

Field names follow the evaluation tasks' schemas (deltamoe/evaluation): perplexity reads `text`, multiple choice
`question`/`choices`/`gold`, translation `source`/`target`, qa_loglik `question`/`answer`.

Text sources: en-kjv (King James Version), en-web (World English Bible), es-rv1909 (Reina-Valera 1909),
es-fortunes (fortunes-es), ru-fortunes (fortunes-ru): the training genres (scripture, sayings). Out of domain: the
aptitude user's manual (aptitude-doc-en/-es/-ru, software documentation), in the three languages from the same
pages and paragraphs (the translations keep paragraph counts), so its passages are parallel; no stage trains on it
or on any other manual (the SFT data, the English Debian FAQ, is documentation too: every model carries that delta).
Splits are deterministic and independent of file order: an item is held out when
sha256(f"{SALT}:{group}:{key}") falls below the held-out fraction. KJV and RV1909 share the KJV versification, so
their passages use the same keys: the same passages are held out in both, and the translation pairs come only from
held-out passages (neither side was trained on). FAQ sections are held out by section number for every language
alike, so held-out English and Russian Q/A are parallel.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.hashing import sha256_file
from deltamoe.common.outputs import atomic_output_dir
from deltamoe.recipes.corpora import fortune_files, read_bible, read_faq, read_fortunes, read_html_manual, read_quiz

FORMAT_VERSION = 3
"""Bump when the files or the split rule change, so cached demo data is rebuilt."""
SALT = "deltamoe-demo-v1"
PASSAGE_VERSES = 8
BIBLE_HELDOUT = 0.05
FORTUNES_HELDOUT = 0.05
FAQ_HELDOUT = 0.30
CAPITAL_FILES = ("africa", "america", "asia", "europe")
MANUAL_LANGUAGES = ("en", "es", "ru")
MANUAL_PASSAGE_BYTES = 800
"""An out-of-domain passage: consecutive paragraphs of one manual page until the English side reaches this many
UTF-8 bytes (the Bible passages are ~1 KB), cut at the same paragraphs in every language."""
SUITE = Path(__file__).with_name("demo_suite.yaml")
NUM_CHOICES = 4


def is_heldout(group: str, key: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"{SALT}:{group}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _ztext_module(package_dir: Path) -> Path:
    modules = sorted((package_dir / "usr/share/sword/modules/texts/ztext").glob("*"))
    if len(modules) != 1:
        raise DeltaMoEError(f"{package_dir}: expected one SWORD zText module under usr/share/sword/modules/texts/ztext, found {len(modules)}")
    return modules[0]


def _find(package_dir: Path, relative: str) -> Path:
    path = package_dir / relative
    if not path.exists():
        raise DeltaMoEError(f"{package_dir}: missing {relative}; is this the right Debian package?")
    return path


def bible_passages(verses: list[str], *, lang: str, source: str, group: str = "bible") -> tuple[list[dict], list[dict]]:
    """(train, heldout) records of PASSAGE_VERSES consecutive verse slots each; empty passages dropped."""
    train, heldout = [], []
    for start in range(0, len(verses), PASSAGE_VERSES):
        text = " ".join(v for v in verses[start : start + PASSAGE_VERSES] if v)
        if not text:
            continue
        record = {"text": text, "lang": lang, "source": source, "id": f"{source}:{start}"}
        (heldout if is_heldout(group, str(start), BIBLE_HELDOUT) else train).append(record)
    return train, heldout


def translation_pairs(source_verses: list[str], target_verses: list[str], *, source_lang: str, target_lang: str) -> tuple[list[dict], int]:
    """(held-out verse pairs, number of pairs overall) for two modules of the same versification."""
    if len(source_verses) != len(target_verses):
        raise DeltaMoEError(f"translation pairs: modules have {len(source_verses)} and {len(target_verses)} verse slots; "
                            "they must share a versification")
    pairs, total = [], 0
    for slot, (src, tgt) in enumerate(zip(source_verses, target_verses)):
        if not (src and tgt):
            continue
        total += 1
        if is_heldout("bible", str(slot - slot % PASSAGE_VERSES), BIBLE_HELDOUT):
            pairs.append({"id": f"slot:{slot}", "source": src, "target": tgt, "source_lang": source_lang, "target_lang": target_lang})
    return pairs, total


def manual_passages(manuals: dict[str, dict[str, list[str]]], *, source: str = "manual") -> dict[str, list[dict]]:
    """Parallel out-of-domain passages per language from one manual's translations (page -> paragraphs each).

    Pages are those every translation has with the same number of paragraphs; each is cut into runs of paragraphs
    whose English text reaches MANUAL_PASSAGE_BYTES (the rest of a page joins its last run; a page shorter than a
    quarter of that is left out). Passages are ordered by
    a salted hash of their id, so an evaluation's `limit` takes a sample of the manual rather than its first pages.
    """
    reference = manuals[MANUAL_LANGUAGES[0]]
    pages = [page for page in sorted(reference)
             if all(len(manuals[lang].get(page, ())) == len(reference[page]) for lang in manuals)]
    if not pages:
        raise DeltaMoEError(f"{source}: no page has the same paragraphs in every language ({', '.join(manuals)})")
    runs = []
    for page in pages:
        start, size = 0, 0
        for i, paragraph in enumerate(reference[page]):
            size += len(paragraph.encode("utf-8"))
            if size >= MANUAL_PASSAGE_BYTES:
                runs.append((page, start, i + 1))
                start, size = i + 1, 0
        if start < len(reference[page]):
            if runs and runs[-1][0] == page:
                runs[-1] = (page, runs[-1][1], len(reference[page]))
            elif size >= MANUAL_PASSAGE_BYTES // 4:  # a page of a few words (a title, a link list) is no passage
                runs.append((page, start, len(reference[page])))
    runs.sort(key=lambda r: hashlib.sha256(f"{SALT}:{source}:{r[0]}:{r[1]}".encode()).hexdigest())
    return {lang: [{"text": "\n\n".join(paragraphs[page][a:b]), "lang": lang, "source": source, "id": f"{page}:{a}-{b}"}
                   for page, a, b in runs]
            for lang, paragraphs in manuals.items()}


def capitals_multiple_choice(pairs: list[tuple[str, str]]) -> list[dict]:
    """4-option questions; distractors are other capitals, drawn with a per-country seed so each item is stable."""
    by_country = {}
    for country, capital in pairs:
        by_country.setdefault(country, capital)
    capitals = sorted(set(by_country.values()))
    if len(capitals) < NUM_CHOICES:
        raise DeltaMoEError(f"capitals: {len(capitals)} distinct capitals, need at least {NUM_CHOICES}")
    items = []
    for country in sorted(by_country):
        capital = by_country[country]
        rng = random.Random(f"{SALT}:capitals:{country}")
        choices = rng.sample([c for c in capitals if c != capital], NUM_CHOICES - 1)
        gold = rng.randrange(NUM_CHOICES)
        choices.insert(gold, capital)
        items.append({"id": country, "question": f"What is the capital of {country}?", "choices": choices,
                      "gold": gold, "lang": "en"})
    return items


def _write_jsonl(path: Path, records: list[dict]) -> int:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return len(records)


def suite_is_current(out: Path) -> bool:
    """Whether the demo data in `out` was built with this version's files and suite (else fetch-demo-assets rebuilds)."""
    manifest_path = Path(out) / "manifest.json"
    if not manifest_path.exists():
        return False
    old = json.loads(manifest_path.read_text())
    return (old.get("format_version"), old.get("suite_sha256")) == (FORMAT_VERSION, sha256_file(SUITE))


def build_demo_data(package_dirs: dict[str, Path], out: Path, *, source_sha256: dict[str, str]) -> Path:
    """Write the demo data files into `out` (atomically); kept as is when built from the same sources already."""
    manifest_path = out / "manifest.json"
    suite_sha256 = sha256_file(SUITE)
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if (old.get("format_version"), old.get("source_sha256"), old.get("suite_sha256")) == (
                FORMAT_VERSION, source_sha256, suite_sha256):
            return out

    counts: dict[str, int] = {}
    with atomic_output_dir(out, overwrite=True) as tmp:
        bibles = {}
        for package, lang, source in (("sword-text-kjv", "en", "kjv"), ("sword-text-web", "en", "web"),
                                      ("sword-text-sparv", "es", "rv1909")):
            bibles[source] = read_bible(_ztext_module(package_dirs[package]))
            # WEB follows another versification (NRSVA): its own split group, so its slots never align with KJV's.
            train, heldout = bible_passages(bibles[source], lang=lang, source=source,
                                            group="bible" if source != "web" else "bible-web")
            counts[f"{lang}-{source}.train.jsonl"] = _write_jsonl(tmp / f"{lang}-{source}.train.jsonl", train)
            counts[f"{lang}-{source}.heldout.jsonl"] = _write_jsonl(tmp / f"{lang}-{source}.heldout.jsonl", heldout)
        pairs, parallel_total = translation_pairs(bibles["kjv"], bibles["rv1909"], source_lang="en", target_lang="es")
        counts["translation.en-es.heldout.jsonl"] = _write_jsonl(tmp / "translation.en-es.heldout.jsonl", pairs)

        for lang in ("ru", "es"):
            train, heldout = [], []
            for path in fortune_files(_find(package_dirs[f"fortunes-{lang}"], f"usr/share/games/fortunes/{lang}")):
                for i, text in enumerate(read_fortunes(path)):
                    record = {"text": text, "lang": lang, "source": "fortunes", "id": f"{path.name}:{i}"}
                    # Split groups per language: the Russian split stays what it was before Spanish fortunes came.
                    group = "fortunes" if lang == "ru" else f"fortunes-{lang}"
                    (heldout if is_heldout(group, record["id"], FORTUNES_HELDOUT) else train).append(record)
            counts[f"{lang}-fortunes.train.jsonl"] = _write_jsonl(tmp / f"{lang}-fortunes.train.jsonl", train)
            counts[f"{lang}-fortunes.heldout.jsonl"] = _write_jsonl(tmp / f"{lang}-fortunes.heldout.jsonl", heldout)

        manuals = {lang: read_html_manual(_find(package_dirs[f"aptitude-doc-{lang}"], f"usr/share/doc/aptitude/html/{lang}"))
                   for lang in MANUAL_LANGUAGES}
        for lang, records in manual_passages(manuals).items():
            counts[f"{lang}-manual.ood.jsonl"] = _write_jsonl(tmp / f"{lang}-manual.ood.jsonl", records)

        faq_root = "usr/share/doc/debian/FAQ"
        faq = {"en": read_faq(_find(package_dirs["debian-faq"], f"{faq_root}/debian-faq.en.txt.gz")),
               "ru": read_faq(_find(package_dirs["debian-faq-ru"], f"{faq_root}/debian-faq.ru.txt.gz"))}
        shared = set.intersection(*({s.number for s in sections} for sections in faq.values()))
        for lang, sections in faq.items():
            qa = [{"id": s.number, "question": s.question, "answer": s.answer, "lang": lang}
                  for s in sections if s.number in shared and is_heldout("faq", s.number, FAQ_HELDOUT)]
            counts[f"faq-qa.{lang}.heldout.jsonl"] = _write_jsonl(tmp / f"faq-qa.{lang}.heldout.jsonl", qa)
        sft = [{"id": s.number, "prompt": s.question, "response": s.answer, "lang": "en"}
               for s in faq["en"] if not is_heldout("faq", s.number, FAQ_HELDOUT)]
        counts["faq-sft.en.train.jsonl"] = _write_jsonl(tmp / "faq-sft.en.train.jsonl", sft)

        quiz = _find(package_dirs["bsdgames"], "usr/share/games/bsdgames/quiz")
        items = capitals_multiple_choice([p for name in CAPITAL_FILES for p in read_quiz(quiz / name)])
        counts["capitals-mc.en.jsonl"] = _write_jsonl(tmp / "capitals-mc.en.jsonl", items)

        shutil.copyfile(SUITE, tmp / SUITE.name)
        manifest = {"format_version": FORMAT_VERSION, "suite_sha256": suite_sha256, "counts": counts, "parallel_verses_total": parallel_total,
                    "faq_sections": {lang: len(s) for lang, s in faq.items()},
                    "split": {"salt": SALT, "passage_verses": PASSAGE_VERSES, "bible_heldout": BIBLE_HELDOUT,
                              "fortunes_heldout": FORTUNES_HELDOUT, "faq_heldout": FAQ_HELDOUT,
                              "manual_passage_bytes": MANUAL_PASSAGE_BYTES},
                    "source_sha256": source_sha256}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return out
