"""Tokenize text or JSONL into a Megatron indexed dataset (.bin/.idx) tagged with its language (.lang.json).

The .bin/.idx pair is exactly what Megatron-LM's tools/preprocess_data.py writes (megatron.core's
IndexedDatasetBuilder, uint16 ids below 65,500 tokens else int32), so `--data-path PREFIX` works in any Megatron
trainer. The sidecar PREFIX.lang.json records the language, the tokenizer, document and token counts and the sha256
of every input; DeltaMoE's training reads it to know which samples are original-language text.

Inputs (several files allowed, .gz is read transparently):
  *.jsonl / *.json   one JSON object per line; the document is the field --json-key (default "text").
  anything else      plain text; one document per blank-line-separated paragraph (default), or one document per
                     line with --text-document line.
Every document ends with the tokenizer's eos token (EOD; --no-append-eod to leave it out), so documents that
Megatron's GPTDataset packs into one sample stay separated. Whitespace-only documents are skipped and counted.

--split-sentences cuts each document with nltk's *untrained* PunktSentenceTokenizer (it needs no downloaded punkt
data): a cut after . ? ! followed by whitespace, no abbreviation list ("Dr. Smith" is cut), and no cut in text
without spaces (Chinese, Japanese). Each sentence is one sequence in the .idx, as in Megatron; the whitespace
between sentences is kept at the start of the next sentence, so the decoded document is unchanged.

Example:
  deltamoe prepare-data --input es_news.jsonl es_web.txt.gz --tokenizer models/smollm2 --lang es \\
      --model models/smollm2 --out data/es_text --workers 8
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import sys
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError
from deltamoe.common.faults import fault_point
from deltamoe.common.hashing import sha256_file, versions
from deltamoe.megatron_ext.data.language_tag import (
    VOCABULARY_FILES,
    InputFile,
    LanguageTag,
    TokenizerInfo,
    check_language_code,
    dataset_files,
    write_language_tag,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text, JSONL (.jsonl/.json) or their .gz")
    parser.add_argument("--tokenizer", required=True, metavar="HF_DIR", help="local Hugging Face tokenizer folder")
    parser.add_argument("--lang", required=True, metavar="CODE", help="language of the text, e.g. en, es, zh-Hans")
    parser.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, PREFIX.lang.json")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the document (default: text)")
    parser.add_argument("--text-document", choices=("paragraph", "line"), default="paragraph",
                        help="plain text: a document per blank-line-separated paragraph (default) or per line")
    parser.add_argument("--split-sentences", action="store_true", help="store each sentence as its own sequence")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="end every document with the tokenizer's eos token (default: on)")
    parser.add_argument("--prepend-bos", action="store_true", help="start every document with the tokenizer's bos token")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--model-vocab-size", type=int, help="refuse a tokenizer with more tokens than this")
    vocab.add_argument("--model", metavar="HF_DIR", help="refuse a tokenizer with more tokens than this model's vocab_size")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at PREFIX")


def main(args: argparse.Namespace) -> int:
    tag = prepare_dataset(
        inputs=args.input, tokenizer_dir=args.tokenizer, language=args.lang, out_prefix=args.out,
        json_key=args.json_key, text_document=args.text_document, split_sentences=args.split_sentences,
        append_eod=args.append_eod, prepend_bos=args.prepend_bos, model_vocab_size=args.model_vocab_size,
        model_dir=args.model, workers=args.workers, overwrite=args.overwrite,
    )
    print(f"{args.out}: {tag.num_documents} documents, {tag.num_tokens} tokens, language {tag.language} "
          f"({tag.options.get('num_skipped_empty', 0)} empty documents skipped)")
    return 0


# ---------------------------------------------------------------- reading documents

def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _is_jsonl(path: Path) -> bool:
    suffixes = path.suffixes[:-1] if path.suffix == ".gz" else path.suffixes
    return bool(suffixes) and suffixes[-1] in (".jsonl", ".json")


def iter_documents(path: Path, *, json_key: str, text_document: str) -> Iterator[str]:
    """Documents of one input file, in order (whitespace-only ones included: the caller counts and skips them)."""
    try:
        with _open_text(path) as f:
            if _is_jsonl(path):
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DeltaMoEError(f"{path}:{line_no}: not a JSON object: {e}") from None
                    if not isinstance(record, dict) or json_key not in record:
                        raise DeltaMoEError(f"{path}:{line_no}: no field {json_key!r} (set --json-key)")
                    if not isinstance(record[json_key], str):
                        raise DeltaMoEError(f"{path}:{line_no}: field {json_key!r} must be a string, got {type(record[json_key]).__name__}")
                    yield record[json_key]
            elif text_document == "line":
                for line in f:
                    yield line.rstrip("\n")
            else:
                paragraph: list[str] = []
                for line in f:
                    if line.strip():
                        paragraph.append(line.rstrip("\n"))
                    elif paragraph:
                        yield "\n".join(paragraph).strip()
                        paragraph = []
                if paragraph:
                    yield "\n".join(paragraph).strip()
    except UnicodeDecodeError as e:
        raise DeltaMoEError(f"{path}: not UTF-8 text: {e}") from None
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged .gz
        raise DeltaMoEError(f"{path}: cannot read: {e}") from None


# ---------------------------------------------------------------- tokenizing (in worker processes)

_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, split_sentences: bool, eod_id: int | None, bos_id: int | None) -> None:
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_dir)
    _WORKER["splitter"] = _sentence_splitter() if split_sentences else None
    _WORKER["eod_id"], _WORKER["bos_id"] = eod_id, bos_id


def _sentence_splitter():
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer()  # untrained on purpose: works without nltk's downloadable punkt data


def split_sentences(text: str, splitter) -> list[str]:
    """Sentences whose concatenation is exactly `text`; whitespace between two sentences starts the second one.

    Cutting at the END of each Punkt span keeps " Ed" together, which is how byte-level BPE pre-tokenizers split
    words, so per-sentence token ids usually equal the whole document's.
    """
    cuts = [end for _, end in splitter.span_tokenize(text)][:-1]
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def encode_document(text: str) -> tuple[list[int], list[int]]:
    """Token ids of one document and the length of each sequence (sentence) in it; EOD counts in the last one."""
    tokenizer, splitter = _WORKER["tokenizer"], _WORKER["splitter"]
    pieces = split_sentences(text, splitter) if splitter is not None else [text]
    ids: list[int] = []
    lengths: list[int] = []
    for piece in pieces:
        piece_ids = tokenizer.encode(piece, add_special_tokens=False)
        if piece_ids:
            ids.extend(piece_ids)
            lengths.append(len(piece_ids))
    if ids and _WORKER["bos_id"] is not None:
        ids.insert(0, _WORKER["bos_id"])
        lengths[0] += 1
    if ids and _WORKER["eod_id"] is not None:
        ids.append(_WORKER["eod_id"])
        lengths[-1] += 1
    return ids, lengths


# ---------------------------------------------------------------- checks

def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """A local Hugging Face tokenizer; never downloads."""
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise DeltaMoEError(f"--tokenizer {path}: not a folder (expected a local Hugging Face tokenizer folder)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- transformers raises many types for a broken folder
        raise DeltaMoEError(f"--tokenizer {path}: cannot load a tokenizer: {e}") from None


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    for name in VOCABULARY_FILES:
        path = Path(tokenizer_dir) / name
        if path.exists():
            digest.update(f"{name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def model_vocab_size_from(model_dir: str | os.PathLike) -> int:
    from deltamoe.common.hf_folder import read_config

    config = read_config(model_dir)
    size = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    if not isinstance(size, int):
        raise DeltaMoEError(f"{Path(model_dir) / 'config.json'}: no integer field 'vocab_size'")
    return size


def _incomplete_marker(prefix: str | os.PathLike) -> Path:
    """Exists while .bin/.idx are being moved into place and the sidecar is not yet written."""
    return Path(f"{os.fspath(prefix)}.deltamoe-incomplete")


def check_output_prefix(prefix: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse an existing dataset unless --overwrite; the files of an interrupted prepare-data run are replaced."""
    from deltamoe.common.outputs import check_writable

    bin_path, idx_path, sidecar = dataset_files(prefix)
    interrupted = _incomplete_marker(prefix).exists() and not sidecar.exists()
    existing = [str(p) for p in dataset_files(prefix) if p.exists()]
    if existing and not overwrite and not interrupted:
        hint = "" if sidecar.exists() else " (no language tag: not written by `deltamoe prepare-data`)"
        raise DeltaMoEError(f"output {', '.join(existing)} already exists: choose another --out or pass --overwrite{hint}")
    parent = Path(os.fspath(prefix)).parent
    if parent.exists() and not parent.is_dir():
        raise DeltaMoEError(f"--out {prefix}: {parent} is not a folder")
    check_writable(parent, what=f"--out {prefix}")


# ---------------------------------------------------------------- the job

def prepare_dataset(
    *, inputs: list[str | os.PathLike], tokenizer_dir: str | os.PathLike, language: str, out_prefix: str | os.PathLike,
    json_key: str = "text", text_document: str = "paragraph", split_sentences: bool = False, append_eod: bool = True,
    prepend_bos: bool = False, model_vocab_size: int | None = None, model_dir: str | os.PathLike | None = None,
    workers: int = 1, overwrite: bool = False,
) -> LanguageTag:
    """Tokenize `inputs` into `out_prefix`.{bin,idx,lang.json}; returns the language tag written."""
    check_language_code(language, what="--lang")
    if workers < 1:
        raise DeltaMoEError(f"--workers must be at least 1, got {workers}")
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise DeltaMoEError(f"--input {path}: no such file")
    check_output_prefix(out_prefix, overwrite=overwrite)

    tokenizer = load_tokenizer(tokenizer_dir)
    if model_dir is not None:
        model_vocab_size = model_vocab_size_from(model_dir)
    if model_vocab_size is not None and len(tokenizer) > model_vocab_size:
        source = f"model {model_dir}" if model_dir is not None else "--model-vocab-size"
        raise DeltaMoEError(
            f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but {source} has vocab_size {model_vocab_size}: "
            "ids past the embedding table would crash training; use the model's own tokenizer"
        )
    eod_id = tokenizer.eos_token_id if append_eod else None
    if append_eod and eod_id is None:
        raise DeltaMoEError(f"tokenizer {tokenizer_dir} has no eos token to end documents with; pass --no-append-eod to write none")
    bos_id = tokenizer.bos_token_id if prepend_bos else None
    if prepend_bos and bos_id is None:
        raise DeltaMoEError(f"--prepend-bos: tokenizer {tokenizer_dir} has no bos token")

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(len(tokenizer))
    bin_path, idx_path, _ = dataset_files(out_prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    leftovers = [p for p in bin_path.parent.iterdir() if p.name.startswith((f".{bin_path.name}.tmp-", f".{idx_path.name}.tmp-"))]
    for leftover in leftovers:
        print(f"removing {leftover} (left by an interrupted prepare-data run)", file=sys.stderr)
        leftover.unlink(missing_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp_bin, tmp_idx = bin_path.with_name(f".{bin_path.name}.tmp-{token}"), idx_path.with_name(f".{idx_path.name}.tmp-{token}")

    init_args = (str(tokenizer_dir), split_sentences, eod_id, bos_id)
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, init_args) if workers > 1 else None
    if pool is None:
        _init_worker(*init_args)
    counts = {"documents": 0, "sequences": 0, "tokens": 0, "skipped": 0}
    input_records = []
    builder = None
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        for path in paths:
            texts = (t for t in _counting_nonempty(iter_documents(path, json_key=json_key, text_document=text_document), counts))
            encoded = _encode_bounded(pool, texts, workers) if pool else map(encode_document, texts)
            num_docs = 0
            for ids, lengths in _progress(encoded, path):
                builder.add_document(ids, lengths)
                num_docs += 1
                counts["sequences"] += len(lengths)
                counts["tokens"] += len(ids)
            if num_docs == 0:
                raise DeltaMoEError(f"--input {path}: no documents (the file is empty or holds only whitespace)")
            counts["documents"] += num_docs
            input_records.append(InputFile(path=str(path.resolve()), sha256=sha256_file(path), num_documents=num_docs))
        builder.finalize(str(tmp_idx))
        tag = LanguageTag(
            language=language,
            tokenizer=TokenizerInfo(name=str(tokenizer.name_or_path), vocab_size=len(tokenizer), eod_id=eod_id,
                                    bos_id=bos_id, fingerprint=tokenizer_fingerprint(tokenizer_dir)),
            num_documents=counts["documents"], num_sequences=counts["sequences"], num_tokens=counts["tokens"],
            dtype=dtype.__name__, inputs=input_records, model_vocab_size=model_vocab_size, versions=versions(),
            options={"json_key": json_key, "text_document": text_document, "split_sentences": split_sentences,
                     "sentence_splitter": "nltk PunktSentenceTokenizer (untrained)" if split_sentences else None,
                     "append_eod": append_eod, "prepend_bos": prepend_bos, "num_skipped_empty": counts["skipped"]},
        )
        # The sidecar marks a complete dataset: drop the old one first, move .bin/.idx in, write the new one last.
        # The marker tells a rerun that .bin/.idx without a sidecar are this command's own, interrupted, output.
        marker = _incomplete_marker(out_prefix)
        marker.write_text(f"prepare-data moving {bin_path.name} and {idx_path.name} into place (pid {os.getpid()})\n")
        dataset_files(out_prefix)[2].unlink(missing_ok=True)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        fault_point("prepare-data:bin-idx-moved")
        write_language_tag(out_prefix, tag)
        marker.unlink(missing_ok=True)
        return tag
    finally:
        if pool is not None:
            pool.terminate()
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)


def _encode_bounded(pool, texts: Iterator[str], workers: int) -> Iterator[tuple[list[int], list[int]]]:
    """Pool.imap in windows: imap alone queues the whole input at once, which for a corpus means all of it in RAM."""
    window = workers * 1024
    while batch := list(itertools.islice(texts, window)):
        yield from pool.imap(encode_document, batch, chunksize=64)


def _counting_nonempty(texts: Iterator[str], counts: dict) -> Iterator[str]:
    for text in texts:
        if text.strip():
            yield text
        else:
            counts["skipped"] += 1


def _progress(items, path: Path):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=f"tokenizing {path.name}", unit=" docs", disable=None, file=sys.stderr)
