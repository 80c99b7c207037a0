"""Language-tagged blends: Megatron GPT datasets whose samples carry their language and the language-prior flag F(t).

A blend is a list of (weight, prefix) as in Megatron's `--data-path 0.7 en_text 0.3 es_text`; each prefix's language
comes from its `PREFIX.lang.json` sidecar (written by `deltamoe prepare-data`). The recipe declares the languages it
trains (their order defines the integer `lang_id`) and which of them are ORIGINAL (the dense model's languages,
served by the frozen expert 0): MoE-LPR's stage-2 loss (Zhou et al. 2024, "MoE-LPR: Multilingual Extension of Large
Language Models through Mixture-of-Experts with Language Priors Routing", arXiv:2408.11396) pushes original-language
tokens, F(t) = 1, to expert 0.

Why the flag is per sample: megatron.core's GPTDataset packs documents into samples but only documents of ONE indexed
dataset (one prefix), and BlendedDataset picks a whole sample from one GPTDataset, recording which in
`BlendedDataset.dataset_index` and returning it as `sample["dataset_id"]`. So every token of a sample has the
language of the prefix the sample came from; `lang_id` is one integer per sample and F(t) is constant inside a sample
(times the LM loss mask, so padding, and EOD when eod_mask_loss is set, never count). This holds only because the
sidecar tags a whole prefix: never put two languages into one prefix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from deltamoe.common.errors import DeltaMoEError
from deltamoe.megatron_ext.data.language_tag import (
    LanguageTag,
    check_language_code,
    dataset_files,
    read_language_tag,
)


@dataclass(kw_only=True)
class BlendEntry:
    weight: float
    prefix: str
    tag: LanguageTag


@dataclass(kw_only=True)
class LanguageBlend:
    """A validated blend: every prefix complete, tagged with a declared language, all from one tokenizer."""

    entries: list[BlendEntry]
    languages: tuple[str, ...]
    """Declared languages; lang_id = position in this tuple (language allocations use the same order)."""
    original_languages: frozenset[str]

    @property
    def prefixes(self) -> list[str]:
        return [e.prefix for e in self.entries]

    @property
    def weights(self) -> list[float]:
        return [e.weight for e in self.entries]

    @property
    def dataset_language_ids(self) -> list[int]:
        """lang_id of each dataset, in blend order (= megatron's dataset_id)."""
        return [self.languages.index(e.tag.language) for e in self.entries]

    def is_original_language(self) -> torch.Tensor:
        """[num_languages] bool: True for the recipe's original languages."""
        return torch.tensor([lang in self.original_languages for lang in self.languages], dtype=torch.bool)

    @property
    def eod_id(self) -> int | None:
        return self.entries[0].tag.tokenizer.eod_id

    @property
    def vocab_size(self) -> int:
        return self.entries[0].tag.tokenizer.vocab_size


def parse_blend(spec: Sequence) -> list[tuple[float, str, str | None]]:
    """(weight, prefix, expected language or None) from pairs/triples, or from Megatron's flat `--data-path` form.

    Accepted: [(w, prefix), ...], [(w, prefix, lang), ...] (lang: what the recipe expects the sidecar to say),
    [w1, p1, w2, p2, ...] or [prefix].
    """
    items = list(spec)
    if not items:
        raise DeltaMoEError("blend: no datasets given")
    if all(isinstance(i, (tuple, list)) for i in items):
        entries = [tuple(i) for i in items]
    elif len(items) == 1:
        entries = [(1.0, items[0])]
    elif len(items) % 2 == 0:
        entries = list(zip(items[0::2], items[1::2]))
    else:
        raise DeltaMoEError(f"blend: expected 'weight prefix' pairs or a single prefix, got {len(items)} items: {items}")
    out = []
    for entry in entries:
        if len(entry) not in (2, 3):
            raise DeltaMoEError(f"blend: entry {entry!r} is not (weight, prefix) or (weight, prefix, language)")
        weight, prefix, expected = (*entry, None) if len(entry) == 2 else entry
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise DeltaMoEError(f"blend: weight {weight!r} for {prefix} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise DeltaMoEError(f"blend: weight for {prefix} must be a positive number, got {weight}")
        out.append((weight, os.fspath(prefix), expected))
    return out


def load_language_blend(
    spec: Sequence, *, original_languages: Iterable[str], languages: Sequence[str] | None = None
) -> LanguageBlend:
    """Read each prefix's sidecar and check it against the recipe's declared and original languages.

    `languages` fixes the lang_id order and refuses datasets in other languages. Without it (Megatron's flags give
    only `--data-path`), the declared languages are the blend's tags in order of first appearance, followed by any
    original language absent from the blend.
    """
    parsed = parse_blend(spec)
    tags = [read_language_tag(prefix) for _, prefix, _ in parsed]
    original = frozenset(original_languages)
    if not original:
        raise DeltaMoEError("blend: no original language given (the dense model's languages, e.g. ['en'])")
    if languages is None:
        languages = list(dict.fromkeys(t.language for t in tags))
        languages += sorted(original - set(languages))
    languages = tuple(languages)
    if not languages:
        raise DeltaMoEError("blend: the recipe declares no languages")
    for code in (*languages, *sorted(original)):
        check_language_code(code, what="declared language")
    if len(set(languages)) != len(languages):
        raise DeltaMoEError(f"blend: declared languages {list(languages)} list a language twice")
    if not original <= set(languages):
        raise DeltaMoEError(
            f"blend: original languages {sorted(original - set(languages))} are not among the declared languages {list(languages)}"
        )
    entries = []
    for (weight, prefix, expected), tag in zip(parsed, tags):
        if expected is not None and tag.language != expected:
            raise DeltaMoEError(
                f"blend: the recipe lists {prefix} as {expected!r} but {prefix}.lang.json tags it {tag.language!r}"
            )
        if tag.language not in languages:
            raise DeltaMoEError(
                f"blend: {prefix} is tagged with language {tag.language!r} ({prefix}.lang.json) but the recipe declares "
                f"only {list(languages)}: add {tag.language!r} to the recipe's languages or drop this dataset"
            )
        for path in dataset_files(prefix)[:2]:
            if not path.exists():
                raise DeltaMoEError(f"blend: {path} is missing although {prefix}.lang.json exists: re-run prepare-data")
        check_indexed_files(prefix, tag)
        entries.append(BlendEntry(weight=weight, prefix=prefix, tag=tag))
    first = entries[0]
    for entry in entries[1:]:
        a, b = first.tag.tokenizer, entry.tag.tokenizer
        if (a.fingerprint, a.vocab_size, a.eod_id) != (b.fingerprint, b.vocab_size, b.eod_id):
            raise DeltaMoEError(
                f"blend: {first.prefix} and {entry.prefix} were tokenized differently (tokenizer {a.name} with "
                f"{a.vocab_size} tokens, eod {a.eod_id} vs {b.name} with {b.vocab_size} tokens, eod {b.eod_id}): "
                "re-run prepare-data with one tokenizer"
            )
    return LanguageBlend(entries=entries, languages=languages, original_languages=original)


_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")  # magic, version 1, dtype code, sequence count, document count (+ 1)


def check_indexed_files(prefix: str, tag: LanguageTag) -> None:
    """.idx header and both file sizes against the sidecar's counts: a truncated or swapped file is refused here, in
    O(1), instead of crashing (or silently reading past the data) inside Megatron's IndexedDataset.

    Layout as megatron.core.datasets.indexed_dataset writes it (_IndexWriter.write): the header, then int32 lengths
    and int64 pointers per sequence and int64 document indices (documents + 1).
    """
    import numpy as np

    bin_path, idx_path, sidecar = dataset_files(prefix)
    idx_size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        header = f.read(_IDX_HEADER.size)
    if len(header) < _IDX_HEADER.size or not header.startswith(_IDX_MAGIC):
        raise DeltaMoEError(f"{idx_path}: not a Megatron index file (truncated or bad header, {idx_size} bytes): "
                            "re-run prepare-data")
    _, version, code, num_sequences, num_doc_indices = _IDX_HEADER.unpack(header)
    expected = (tag.num_sequences, tag.num_documents + 1)
    if (num_sequences, num_doc_indices) != expected:
        raise DeltaMoEError(f"{idx_path}: holds {num_sequences} sequences / {num_doc_indices - 1} documents but "
                            f"{sidecar.name} records {expected[0]} / {expected[1] - 1}: the files do not belong "
                            "together; re-run prepare-data")
    want_idx = _IDX_HEADER.size + 12 * num_sequences + 8 * num_doc_indices
    if idx_size != want_idx:
        raise DeltaMoEError(f"{idx_path}: {idx_size} bytes, expected {want_idx} for {num_sequences} sequences "
                            "(truncated or damaged): re-run prepare-data")
    lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=_IDX_HEADER.size, shape=(num_sequences,))
    total = int(lengths.sum(dtype=np.int64))
    del lengths
    if total != tag.num_tokens:
        raise DeltaMoEError(f"{idx_path}: its sequences hold {total} tokens in all but {sidecar.name} records "
                            f"{tag.num_tokens}: the files do not belong together; re-run prepare-data")
    itemsize = np.dtype(tag.dtype).itemsize
    want_bin = tag.num_tokens * itemsize
    if bin_path.stat().st_size != want_bin:
        raise DeltaMoEError(f"{bin_path}: {bin_path.stat().st_size} bytes, expected {want_bin} ({tag.num_tokens} "
                            f"{tag.dtype} tokens per {sidecar.name}): truncated or damaged; re-run prepare-data")


def check_blend_fits_model(blend: LanguageBlend, *, vocab_size: int, checkpoint: str | os.PathLike) -> None:
    """The data was tokenised for this model: its tokenizer has no ids past the model's vocabulary, and when the
    checkpoint carries tokenizer files (`deltamoe import` copies them) they are the files prepare-data hashed."""
    from deltamoe.megatron_ext.data.language_tag import VOCABULARY_FILES
    from deltamoe.megatron_ext.data.prepare import tokenizer_fingerprint

    checkpoint = Path(checkpoint)
    has_tokenizer = any((checkpoint / name).exists() for name in VOCABULARY_FILES)
    fingerprint = tokenizer_fingerprint(checkpoint) if has_tokenizer else None
    for entry in blend.entries:
        tok, sidecar = entry.tag.tokenizer, f"{entry.prefix}.lang.json"
        if tok.vocab_size > vocab_size:
            raise DeltaMoEError(
                f"{sidecar}: tokenized with {tok.name} ({tok.vocab_size} tokens) but the model's vocab_size is "
                f"{vocab_size} ({checkpoint}/deltamoe.json): token ids >= {vocab_size} have no embedding row; re-run "
                f"prepare-data with the model's tokenizer (--tokenizer {checkpoint})")
        if fingerprint is not None and tok.fingerprint != fingerprint:
            raise DeltaMoEError(
                f"{sidecar}: tokenized with {tok.name} (vocabulary sha256 {tok.fingerprint[:12]}…) but the model's "
                f"tokenizer files in {checkpoint} hash to {fingerprint[:12]}…: the ids would mean other tokens; "
                f"re-run prepare-data with --tokenizer {checkpoint}")


@dataclass
class _SidecarTokenizer:
    """The two facts GPTDataset needs from a tokenizer, taken from the sidecars when the trainer passes none."""

    eod: int
    vocab_size: int
    fingerprint: str = ""

    @property
    def unique_identifiers(self) -> dict:
        # megatron hashes this into its index-cache file names.
        return {"class": type(self).__name__, "eod": self.eod, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}


def gpt_dataset_config(blend: LanguageBlend, *, sequence_length: int, random_seed: int, split: str = "100,0,0",
                       path_to_cache: str | None = None, tokenizer=None, **overrides):
    """A megatron GPTDatasetConfig for `blend` (mask/position options default off, as Megatron's flags do)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    if tokenizer is None:
        # -1 never occurs in a dataset, so datasets written without EOD get no EOD masking.
        tokenizer = _SidecarTokenizer(eod=-1 if blend.eod_id is None else blend.eod_id, vocab_size=blend.vocab_size,
                                      fingerprint=blend.entries[0].tag.tokenizer.fingerprint)
    fields = {"reset_position_ids": False, "reset_attention_mask": False, "eod_mask_loss": False,
              "create_attention_mask": False, **overrides}
    return GPTDatasetConfig(random_seed=random_seed, sequence_length=sequence_length, blend=_megatron_blend(blend),
                            split=split, path_to_cache=path_to_cache, tokenizer=tokenizer, **fields)


def _megatron_blend(blend: LanguageBlend) -> tuple[list[str], list[float] | None]:
    # One prefix without weights makes megatron return the GPTDataset itself (no BlendedDataset over one dataset).
    return (blend.prefixes, None) if len(blend.entries) == 1 else (blend.prefixes, blend.weights)


def build_language_tagged_datasets(
    blend: LanguageBlend, config, sizes: Sequence[int | None], is_built_on_rank: Callable[[], bool] = lambda: True
) -> list[LanguageTaggedDataset | None]:
    """Train/valid/test datasets from BlendedMegatronDatasetBuilder, each wrapped to add lang_id and F(t).

    `config` is a GPTDatasetConfig (e.g. from Megatron's own flags); its blend is replaced by `blend`'s so the
    dataset_id megatron reports always indexes `blend.entries`.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    if config.blend_per_split is not None:
        raise DeltaMoEError("language-tagged datasets take one blend for all splits; config.blend_per_split must be None")
    eod = getattr(config.tokenizer, "eod", None)
    if blend.eod_id is not None and eod != blend.eod_id:
        raise DeltaMoEError(
            f"the trainer's tokenizer ends documents with id {eod} but {blend.prefixes[0]} was written with eod "
            f"{blend.eod_id}: the training tokenizer must be the one given to prepare-data"
        )
    if len(blend.entries) > 1 and any(size is None for size in sizes):
        raise DeltaMoEError(
            f"a weighted blend needs a sample count for every split (0 for an unused split), got sizes {list(sizes)}"
        )
    config = dataclasses.replace(config, blend=_megatron_blend(blend))
    splits = BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), is_built_on_rank, config).build()
    return [None if ds is None else LanguageTaggedDataset(ds, blend) for ds in splits]


class LanguageTaggedDataset(torch.utils.data.Dataset):
    """Megatron GPT samples plus `dataset_id`, `lang_id` and `original_language_mask` (F(t) for each token)."""

    def __init__(self, dataset, blend: LanguageBlend):
        from megatron.core.datasets.blended_dataset import BlendedDataset

        self.dataset = dataset
        self.blend = blend
        self.is_blended = isinstance(dataset, BlendedDataset)
        if self.is_blended and len(dataset.datasets) != len(blend.entries):
            raise DeltaMoEError(f"blended dataset has {len(dataset.datasets)} datasets, the blend {len(blend.entries)}")
        if not self.is_blended and len(blend.entries) != 1:
            raise DeltaMoEError(f"a single GPTDataset cannot stand for a blend of {len(blend.entries)} prefixes")
        self.dataset_lang_ids = torch.tensor(blend.dataset_language_ids, dtype=torch.long)
        self.is_original_language = blend.is_original_language()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = dict(self.dataset[idx])
        dataset_id = int(sample.pop("dataset_id", 0))
        lang_id = self.dataset_lang_ids[dataset_id]
        sample["dataset_id"] = torch.tensor(dataset_id, dtype=torch.long)
        sample["lang_id"] = lang_id.clone()
        sample["original_language_mask"] = original_language_mask(lang_id, self.is_original_language, sample["loss_mask"])
        return sample


def original_language_mask(lang_id: torch.Tensor, is_original_language: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """F(t): 1.0 where the token belongs to an original-language sample and counts in the LM loss, else 0.0.

    Works on one sample (lang_id scalar, loss_mask [S]) or a batch (lang_id [B], loss_mask [B, S]); the trainer can
    broadcast only lang_id across tensor-parallel ranks and rebuild F(t) on each.
    """
    flags = is_original_language.to(loss_mask.device)[lang_id].to(loss_mask.dtype)
    return flags.unsqueeze(-1) * loss_mask if loss_mask.dim() > flags.dim() else flags * loss_mask
