"""vLLM backend: the same scoring rules as the transformers backend, with vLLM's engine for speed on GPUs.

Imported only by `load_backend("vllm", ...)` after the `HAVE_VLLM` guard; vLLM is never a dependency.
Log-likelihoods come from `prompt_logprobs` over the token ids that `TokenizedBackend.encode_pair` produced, so
tokenization at the context/continuation boundary is the same as with transformers. Routing analysis needs forward
hooks and is only available with the transformers backend.
"""

from __future__ import annotations

from pathlib import Path

from deltamoe.common.errors import DeltaMoEError
from deltamoe.evaluation.backends import TokenizedBackend, check_model_dir


class VLLMBackend(TokenizedBackend):
    name = "vllm"

    def __init__(self, model_dir: str | Path, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 8, max_length: int = 2048):
        from vllm import LLM

        self.model_dir = check_model_dir(model_dir)
        self.dtype = dtype or "bfloat16"
        self.batch_size = batch_size
        # +1: the prompt holds context + the whole continuation (max_length + 1 tokens), the HF backend's input plus
        # the last scored token, which prompt_logprobs needs to see.
        self.llm = LLM(model=str(self.model_dir), dtype=self.dtype, max_model_len=max_length + 1, seed=0)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_length = max_length
        self._set_special_ids()

    def loglikelihood_tokens(self, requests, desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        from vllm import SamplingParams, TokensPrompt

        prompts, conts = [], []
        for ctx, cont in requests:
            prompts.append(TokensPrompt(prompt_token_ids=(ctx + cont)[-(self.max_length + 1):]))
            conts.append(cont)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        results = []
        for prompt, cont, out in zip(prompts, conts, self.llm.generate(prompts, params)):
            ids = prompt["prompt_token_ids"]
            total, greedy = 0.0, True
            for pos in range(len(ids) - len(cont), len(ids)):
                entry = out.prompt_logprobs[pos][ids[pos]]
                total += entry.logprob
                greedy = greedy and entry.rank == 1
            results.append((total, greedy))
        return results

    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: list[str] = (), desc: str = "generate"
                 ) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=list(stop) or None)
        return [out.outputs[0].text for out in self.llm.generate(list(prompts), params)]

    def router_modules(self) -> list:
        raise DeltaMoEError("routing analysis needs forward hooks: run it with --backend hf")

    def record_router_choices(self):
        raise DeltaMoEError("routing analysis needs forward hooks: run it with --backend hf")

    def describe(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "batch_size": self.batch_size, "max_length": self.max_length}
