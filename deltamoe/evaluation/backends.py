"""Model backends for evaluation: transformers (CPU or GPU, batched) and, when installed, vLLM.

Log-likelihoods follow lm-evaluation-harness's HF backend (`lm_eval/api/model.py`, `models/huggingface.py`) so
our numbers can be compared with theirs: trailing spaces of the context move to the continuation, context and
continuation are encoded *together* and split at the length of the encoded context (`_encode_pair`), the input is
`(context + continuation)[-(max_length + 1):][:-1]`, and the score is the sum of the continuation tokens'
log-probabilities plus whether each of them was the greedy choice. Precision: bf16 on GPU, fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltamoe.common.errors import DeltaMoEError

try:  # vLLM is optional; nothing else in the package imports it.
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise DeltaMoEError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise DeltaMoEError(f"model folder {path} has no config.json: expected a Hugging Face checkpoint folder")
    return path


class TokenizedBackend:
    """Tokenization rules shared by every backend (they decide which tokens are scored)."""

    tokenizer = None
    max_length: int
    prefix_token_id: int
    model_dir: Path

    def tok_encode(self, text: str) -> list[int]:
        """The tokenizer's own default for special tokens, unless the text already starts with BOS (a chat template)."""
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's `_encode_pair` for causal models."""
        if not context:
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    def apply_chat_template(self, user_text: str) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DeltaMoEError(f"model folder {self.model_dir}: the tokenizer has no chat template, but the task asks for one")
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True)

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) windows that predict every token of the text exactly once.

        lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`: the first window predicts
        up to max_length tokens from the prefix token (BOS, or EOS without BOS); each later window predicts the
        next max_length tokens (fewer at the end) conditioned on as many earlier tokens as still fit. One deliberate
        difference: the text is encoded *without* special tokens, so a BOS-adding tokenizer does not make us score
        log p(BOS | BOS) as part of the text (lm-eval does unless its `add_bos_token=False`).
        """
        tokens = self.tokenizer.encode(text, add_special_tokens=False)
        size = self.max_length
        windows = [([self.prefix_token_id], tokens[:size])] if tokens else []
        predicted = len(windows[0][1]) if windows else 0
        while predicted < len(tokens):
            end = min(len(tokens), predicted + size)
            windows.append((tokens[end - size - 1:predicted], tokens[predicted:end]))
            predicted = end
        return windows

    def loglikelihood(self, pairs: list[tuple[str, str]], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], desc=desc)

    def loglikelihood_tokens(self, requests, desc=""):
        raise NotImplementedError

    def _set_special_ids(self):
        tok = self.tokenizer
        # lm-eval conditions an empty context on BOS, or EOS when the tokenizer has no BOS.
        self.prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


class HFBackend(TokenizedBackend):
    """A causal LM from a local Hugging Face folder, scored with transformers."""

    name = "transformers"

    def __init__(self, model_dir: str | Path, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 8, max_length: int = 2048):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = check_model_dir(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                      "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}.get(
            dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        if self.dtype is None:
            raise DeltaMoEError(f"dtype {dtype!r} is unknown; expected bfloat16, float16 or float32")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        except (OSError, ValueError) as e:
            raise DeltaMoEError(f"model folder {self.model_dir}: no usable tokenizer ({e})") from None
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()
        model_max = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, model_max)
        self.batch_size = batch_size
        self._set_special_ids()

    # -- scoring --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood_tokens(self, requests: list[tuple[list[int], list[int]]], desc: str = "loglikelihood"
                             ) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, all continuation tokens greedy) for each (context ids, continuation ids)."""
        inputs = []
        for ctx, cont in requests:
            if not cont:
                raise DeltaMoEError("a continuation encodes to zero tokens; nothing to score")
            if len(cont) > self.max_length:
                raise DeltaMoEError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
            inputs.append(((ctx + cont)[-(self.max_length + 1):][:-1], cont))
        # Longest first: the first batch fails fast if memory is short, and padding is minimal.
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, leave=False):
            idx = order[start:start + self.batch_size]
            width = len(inputs[idx[0]][0])
            ids = torch.full((len(idx), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = inputs[i][0]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(idx):
                seq, cont = inputs[i]
                n = len(cont)
                cont_logits = logits[row, len(seq) - n:len(seq)].float().log_softmax(-1)
                target = torch.tensor(cont, device=cont_logits.device)
                logprob = cont_logits.gather(-1, target[:, None]).sum().item()
                greedy = bool((cont_logits.argmax(-1) == target).all().item())
                results[i] = (logprob, greedy)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: list[str] = (), desc: str = "generate"
                 ) -> list[str]:
        """Greedy continuations, cut at the first stop string. Batched with left padding."""
        tok = self.tokenizer
        outputs: list[str | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, leave=False):
            idx = order[start:start + self.batch_size]
            encoded = [self.tok_encode(prompts[i])[-(self.max_length - max_new_tokens):] for i in idx]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(idx), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, e in enumerate(encoded):
                ids[row, width - len(e):] = torch.tensor(e)
                mask[row, width - len(e):] = 1
            kwargs = {"stop_strings": list(stop), "tokenizer": tok} if stop else {}
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=self.pad_token_id, **kwargs)
            for row, i in enumerate(idx):
                text = tok.decode(out[row, width:], skip_special_tokens=True)
                for s in stop:
                    text = text.split(s)[0]
                outputs[i] = text
        return outputs  # type: ignore[return-value]

    def router_modules(self) -> list[torch.nn.Module]:
        return [m for m in self.model.modules() if type(m).__name__.endswith("TopKRouter")]

    @contextlib.contextmanager
    def record_router_choices(self) -> Iterator[list[list[torch.Tensor]]]:
        """Record each MoE layer's top-k expert indices per token (forward hooks on the router modules).

        transformers 5 gives Mixtral, Qwen2-MoE and Qwen3-MoE a `*TopKRouter` module returning
        (logits, scores, indices); we keep the indices, i.e. the experts the model really used.
        """
        routers = self.router_modules()
        if not routers:
            raise DeltaMoEError(
                f"model folder {self.model_dir}: no MoE router modules found ({type(self.model).__name__}); "
                "routing analysis needs a Mixtral, Qwen2-MoE or Qwen3-MoE model")
        records: list[list[torch.Tensor]] = [[] for _ in routers]
        hooks = [r.register_forward_hook(lambda mod, inp, out, k=k: records[k].append(out[2].detach().cpu()))
                 for k, r in enumerate(routers)]
        try:
            yield records
        finally:
            for h in hooks:
                h.remove()

    @property
    def num_experts(self) -> int:
        cfg = self.model.config
        for attr in ("num_local_experts", "num_experts"):
            if getattr(cfg, attr, None):
                return int(getattr(cfg, attr))
        raise DeltaMoEError(f"model folder {self.model_dir}: config has no num_local_experts/num_experts")

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "batch_size": self.batch_size, "max_length": self.max_length}


def load_backend(kind: str, model_dir: str | Path, **kwargs) -> HFBackend:
    """`hf` (transformers) or `vllm`. vLLM offers generation and log-likelihood, not routing analysis."""
    if kind == "hf":
        return HFBackend(model_dir, **kwargs)
    if kind == "vllm":
        if not HAVE_VLLM:
            raise DeltaMoEError("backend 'vllm' asked for, but vLLM is not installed (pip install vllm), or use --backend hf")
        from deltamoe.evaluation.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, **kwargs)
    raise DeltaMoEError(f"backend {kind!r} is unknown; expected hf or vllm")


def bits_per_byte(sum_logprob: float, num_bytes: int) -> float:
    """-sum(log p) / (ln 2 * bytes): nats to bits, per UTF-8 byte, comparable across tokenizers."""
    return -sum_logprob / (math.log(2) * num_bytes)
