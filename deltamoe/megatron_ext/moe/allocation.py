"""Language-allocated experts: which experts each language's tokens may be routed to.

An allocation maps each language to a set of experts, e.g. {en: [0], es: [1, 2], ru: [3, 4]}, with an optional
shared pool that every language may also use. Masking the router logits of a token outside its language's set to
-inf before top-k routes it only to allowed experts, and the softmax over the chosen (or all) logits renormalises
over them. The allocation loss in `routing_losses.allocation_loss` is the soft counterpart: it pushes router mass
onto the allowed set without forbidding the rest; with {en: [0]} it is MoE-LPR's language-prior loss.

Language ids are positions in `languages`, the same order as the data blend's declared languages
(`deltamoe.megatron_ext.data.blend.LanguageBlend.languages`). A declared language without an entry may use every
expert; lang_id -1 also means "no restriction". This module is plain torch: no megatron import.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch

from deltamoe.common.errors import DeltaMoEError

_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")


@dataclass(kw_only=True)
class ExpertAllocation:
    """Language -> allowed experts, validated against the MoE shape it will mask."""

    languages: list[str]
    """Declared languages in lang_id order (the recipe's language list)."""
    experts: dict[str, list[int]]
    """Experts each language may use (besides shared_experts). Languages left out may use every expert. Sets of
    different languages may overlap (e.g. two original languages both on the frozen expert 0)."""
    num_experts: int
    """Routed experts per MoE layer (E)."""
    topk: int
    """Experts chosen per token (K): every language must be allowed at least K experts."""
    shared_experts: list[int] = field(default_factory=list)
    """Experts every language may use, on top of its own set."""
    expert_model_parallel_size: int = 1

    def __post_init__(self):
        if self.num_experts < 1:
            raise DeltaMoEError(f"expert allocation: num_experts must be at least 1, got {self.num_experts}")
        if not 1 <= self.topk <= self.num_experts:
            raise DeltaMoEError(f"expert allocation: topk ({self.topk}) must be between 1 and num_experts ({self.num_experts})")
        if self.expert_model_parallel_size < 1 or self.num_experts % self.expert_model_parallel_size:
            raise DeltaMoEError(
                f"expert allocation: num_experts ({self.num_experts}) must be divisible by "
                f"expert_model_parallel_size ({self.expert_model_parallel_size})"
            )
        self.languages = list(self.languages)
        for code in self.languages:
            if not isinstance(code, str) or not _LANGUAGE_CODE.match(code):
                raise DeltaMoEError(f"expert allocation: {code!r} in languages is not a language code such as 'en' or 'zh-Hans'")
        if len(set(self.languages)) != len(self.languages):
            raise DeltaMoEError(f"expert allocation: languages {self.languages} list a language twice")
        if not self.experts:
            raise DeltaMoEError("expert allocation: no language is allocated any expert (experts is empty)")
        self.shared_experts = self._check_set("shared_experts", self.shared_experts, allow_empty=True)
        owner = set(self.shared_experts)
        checked = {}
        for lang, experts in self.experts.items():
            if lang not in self.languages:
                raise DeltaMoEError(
                    f"expert allocation: unknown language {lang!r}; the declared languages are {self.languages}"
                )
            checked[lang] = self._check_set(f"experts[{lang!r}]", experts, allow_empty=False)
            for e in checked[lang]:
                if e in owner:
                    raise DeltaMoEError(
                        f"expert allocation: expert {e} is listed in both shared_experts and experts[{lang!r}]; "
                        "list it once (shared experts are already allowed to every language)"
                    )
            allowed = len(checked[lang]) + len(self.shared_experts)
            if allowed < self.topk:
                raise DeltaMoEError(
                    f"expert allocation: {lang!r} may use {allowed} experts ({checked[lang]} + shared "
                    f"{self.shared_experts}) but topk is {self.topk}: top-k would have to pick a forbidden expert"
                )
        self.experts = checked
        self._warn_single_rank_languages()

    def _check_set(self, name: str, experts, *, allow_empty: bool) -> list[int]:
        experts = list(experts)
        if not experts and not allow_empty:
            raise DeltaMoEError(f"expert allocation: {name} is empty; give at least topk ({self.topk}) experts")
        for e in experts:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.num_experts:
                raise DeltaMoEError(
                    f"expert allocation: {name} has expert {e!r}, outside 0..{self.num_experts - 1} (num_experts={self.num_experts})"
                )
        duplicates = sorted({e for e in experts if experts.count(e) > 1})
        if duplicates:
            raise DeltaMoEError(f"expert allocation: {name} lists expert(s) {duplicates} more than once")
        return sorted(experts)

    def _warn_single_rank_languages(self) -> None:
        ep = self.expert_model_parallel_size
        if ep == 1:
            return
        per_rank = self.num_experts // ep
        for lang in self.experts:
            ranks = {e // per_rank for e in self.allowed_experts(lang)}
            if len(ranks) == 1:
                warnings.warn(
                    f"expert allocation: every expert allowed to {lang!r} lives on expert-parallel rank "
                    f"{ranks.pop()} of {ep}; that rank alone computes all tokens of {lang!r}",
                    stacklevel=4,
                )

    def allowed_experts(self, language: str) -> list[int]:
        """Sorted experts `language` may use (every expert when it has no entry)."""
        if language not in self.languages:
            raise DeltaMoEError(f"expert allocation: unknown language {language!r}; declared: {self.languages}")
        if language not in self.experts:
            return list(range(self.num_experts))
        return sorted(set(self.experts[language]) | set(self.shared_experts))

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[num_languages, num_experts] bool; row i = experts allowed to languages[i]."""
        return build_allocation_mask(self, device=device)


def build_allocation_mask(allocation: ExpertAllocation, device: torch.device | str | None = None) -> torch.Tensor:
    mask = torch.zeros(len(allocation.languages), allocation.num_experts, dtype=torch.bool, device=device)
    for i, lang in enumerate(allocation.languages):
        mask[i, allocation.allowed_experts(lang)] = True
    return mask


def check_lang_ids(lang_ids: torch.Tensor, num_languages: int) -> None:
    """Raise DeltaMoEError unless lang_ids are integers in -1..num_languages-1.

    Call once per batch (it reads the values, a device sync on GPU); the per-layer functions below do not check.
    """
    if lang_ids.dtype not in (torch.int32, torch.int64):
        raise DeltaMoEError(f"lang_ids must be an integer tensor, got {lang_ids.dtype}")
    if lang_ids.numel() and (int(lang_ids.max()) >= num_languages or int(lang_ids.min()) < -1):
        raise DeltaMoEError(
            f"lang_ids range {int(lang_ids.min())}..{int(lang_ids.max())} does not fit an allocation over "
            f"{num_languages} languages (valid: -1..{num_languages - 1})"
        )


def token_lang_ids(lang_id: torch.Tensor, seq_length: int, *, sequence_first: bool = True) -> torch.Tensor:
    """Per-token lang ids from the per-sample `lang_id` [B] of a batch (a sample has one language, see data/blend.py).

    Megatron's transformer layers, and so its router, see tokens in [s, b] order: the default returns [S, B], which
    flattens like the router's [S*B, E] logits. Under sequence or context parallelism pass the local sequence length.
    Per-token masks ([B, S], e.g. original_language_mask) need the same layout: use `.t()`.
    """
    ids = lang_id.reshape(1, -1).expand(seq_length, -1)
    return ids if sequence_first else ids.t()


def allowed_for_tokens(lang_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[..., E] bool: the allowed experts of each token's language; lang_id -1 allows every expert."""
    allowed = mask.to(lang_ids.device)[lang_ids.clamp(min=0).long()]
    return allowed | (lang_ids < 0).unsqueeze(-1)


def mask_router_logits(logits: torch.Tensor, lang_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Router logits [..., E] with experts outside each token's allowed set at -inf; apply before top-k.

    `lang_ids` has the logits' leading shape (per token; expand a per-sample lang_id over the sequence first).
    Top-k then picks only allowed experts (every set has at least K of them), and a softmax over the picked or over
    all logits gives forbidden experts exactly 0, so routing weights renormalise over the allowed experts.
    """
    if logits.shape[:-1] != lang_ids.shape:
        raise DeltaMoEError(f"lang_ids shape {tuple(lang_ids.shape)} must equal the router logits' token shape {tuple(logits.shape[:-1])}")
    if logits.shape[-1] != mask.shape[-1]:
        raise DeltaMoEError(f"router logits have {logits.shape[-1]} experts, the allocation mask {mask.shape[-1]}")
    return logits.masked_fill(~allowed_for_tokens(lang_ids, mask), float("-inf"))


def idle_experts(mask: torch.Tensor, present_languages: list[int]) -> list[int]:
    """Experts no token can reach under by-language masking: allowed to none of the languages present in the data
    (`present_languages`: lang_ids of the blend's datasets). They receive no tokens by design, so training must leave
    them exactly as they are (the trainer freezes them; freezing.py)."""
    if not present_languages:
        return []
    reachable = mask[sorted(set(present_languages))].any(dim=0)
    return [e for e in range(mask.shape[1]) if not bool(reachable[e])]
