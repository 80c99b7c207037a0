"""MoE experts computed as grouped GEMMs that do no weight-gradient work for frozen experts.

DeltaMoE freezes expert 0 (the original FFN) in stage 1 and every expert in stage 2 (routers only). megatron-core's
experts compute a weight gradient for every expert whose tokens pass through them unless the whole linear is frozen,
and without Transformer Engine its grouped-GEMM option falls back to a Python loop over `SequentialMLP` experts.

`FrozenAwareGroupedMLP` keeps `SequentialMLP`'s modules and parameters (`local_experts.{i}.linear_fc1.weight`,
`local_experts.{i}.linear_fc2.weight`), so state dicts and `torch_dist` checkpoints are interchangeable with
megatron's local and TE specs, and replaces only the computation:
- forward: one grouped GEMM per linear (`torch._grouped_mm`; Hopper kernels on H100/H200, a fallback elsewhere) over
  the tokens already sorted by expert, or a loop of `torch.mm` when grouped GEMM is off or shapes are unaligned;
- backward: the input gradient for all experts (routers and earlier layers need it) and weight gradients only for
  experts whose weights require grad, as one grouped GEMM when those experts are contiguous. Frozen experts get
  `grad = None`, so an optimizer with weight decay leaves them bit-identical.
Configurations this path does not cover (biases, FP8/FP4, delayed weight gradients, probabilities applied on input)
run `SequentialMLP.forward` unchanged.
"""

from __future__ import annotations

import itertools

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

_GROUPED_MM = getattr(torch, "_grouped_mm", None)


def _offsets(counts, device) -> torch.Tensor:
    return torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)


def _bounds(counts):
    ends = list(itertools.accumulate(counts))
    return [(end - count, end) for count, end in zip(counts, ends)]


def _forward(x, weights, counts, grouped):
    """y[tokens of e] = x[tokens of e] @ W_e^T."""
    out_features = weights[0].shape[0]
    if grouped and x.shape[0] > 0:
        return _GROUPED_MM(x, torch.stack(weights).transpose(1, 2), offs=_offsets(counts, x.device))
    y = x.new_empty(x.shape[0], out_features)
    for (start, end), weight in zip(_bounds(counts), weights):
        torch.mm(x[start:end], weight.t(), out=y[start:end])
    return y


def _input_grad(dy, weights, counts, grouped):
    if grouped and dy.shape[0] > 0:
        return _GROUPED_MM(dy, torch.stack(weights), offs=_offsets(counts, dy.device))
    dx = dy.new_empty(dy.shape[0], weights[0].shape[1])
    for (start, end), weight in zip(_bounds(counts), weights):
        torch.mm(dy[start:end], weight, out=dx[start:end])
    return dx


def _weight_grads(dy, x, counts, trainable, grouped):
    """dW_e = dy_e^T x_e for the trainable experts only; one grouped GEMM over a contiguous run of them."""
    bounds = _bounds(counts)
    contiguous = trainable == list(range(trainable[0], trainable[-1] + 1))
    if grouped and contiguous:
        start, end = bounds[trainable[0]][0], bounds[trainable[-1]][1]
        run = [counts[e] for e in trainable]
        if end > start:
            grads = _GROUPED_MM(dy[start:end].t(), x[start:end], offs=_offsets(run, dy.device))
            return dict(zip(trainable, grads.unbind(0)))
    return {e: dy[bounds[e][0]:bounds[e][1]].t().mm(x[bounds[e][0]:bounds[e][1]]) for e in trainable}


class GroupedLinear(torch.autograd.Function):
    """y = per-expert x @ W_e^T over expert-sorted tokens; weight grads only where `ctx.needs_input_grad` says so."""

    @staticmethod
    def forward(ctx, x, counts, grouped, *weights):
        ctx.counts, ctx.grouped = counts, grouped
        ctx.save_for_backward(x, *weights)  # the weights are parameters: saving them costs no memory
        return _forward(x, weights, counts, grouped)

    @staticmethod
    def backward(ctx, dy):
        x, *weights = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _input_grad(dy, weights, ctx.counts, ctx.grouped) if ctx.needs_input_grad[0] else None
        trainable = [e for e in range(len(weights)) if ctx.needs_input_grad[3 + e]]
        weight_grads = [None] * len(weights)
        if trainable:
            for e, grad in _weight_grads(dy, x, ctx.counts, trainable, ctx.grouped).items():
                weight_grads[e] = grad.to(weights[e].dtype)
        return (dx, None, None, *weight_grads)


def grouped_linear(x, counts, weights, *, grouped: bool) -> torch.Tensor:
    """Apply expert e's `weights[e]` ([out, in]) to its `counts[e]` consecutive rows of `x` ([tokens, in])."""
    if len(counts) != len(weights):
        raise ValueError(f"grouped_linear: {len(counts)} token counts for {len(weights)} expert weights")
    if sum(counts) != x.shape[0]:
        raise ValueError(f"grouped_linear: token counts sum to {sum(counts)} but the input has {x.shape[0]} rows")
    return GroupedLinear.apply(x.contiguous(), tuple(counts), grouped, *weights)


def grouped_mm_usable(config, weights) -> bool:
    """Whether `torch._grouped_mm` serves these weights: asked for, a kernel for the device, 16-byte row strides.

    On CUDA torch ships grouped-GEMM kernels for bfloat16 on Hopper and newer (H100/H200); elsewhere on CUDA the
    per-expert loop is the known-good path. On CPU torch has only a reference implementation, which stacks every
    expert's weights on each call (measured: 10% of a SmolLM2 MoE training step in the CPU demo): the loop is faster.
    """
    if _GROUPED_MM is None or not config.moe_grouped_gemm:
        return False
    w = weights[0]
    if not w.is_cuda or not (w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(w.device)[0] >= 9):
        return False
    return all((dim * p.element_size()) % 16 == 0 for p in weights for dim in p.shape)


class FrozenAwareGroupedMLP(SequentialMLP):
    """`SequentialMLP`'s parameters and checkpoint keys, grouped-GEMM compute, no weight grads for frozen experts."""

    def _fast_path_supported(self) -> bool:
        c = self.config
        return not (c.add_bias_linear or c.fp8 or getattr(c, "fp4", None) or c.moe_apply_probs_on_input
                    or getattr(c, "delay_wgrad_compute", False) or getattr(c, "use_te_activation_func", False))

    def _activation(self, h):
        c = self.config
        if not c.gated_linear_unit:
            return c.activation_func(h)
        gate, linear = torch.chunk(h, 2, dim=-1)
        clamp = getattr(c, "activation_func_clamp_value", None)
        if clamp is not None:
            gate = gate.clamp(min=None, max=clamp)
            linear = linear.clamp(min=-clamp, max=clamp)
        return c.activation_func(gate) * (linear + getattr(c, "glu_linear_offset", 0.0))

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        if not self._fast_path_supported():
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        counts = [int(n) for n in tokens_per_expert.tolist()]
        fc1 = [expert.linear_fc1.weight for expert in self.local_experts]
        fc2 = [expert.linear_fc2.weight for expert in self.local_experts]
        grouped = grouped_mm_usable(self.config, fc1 + fc2)
        hidden = grouped_linear(permuted_local_hidden_states, counts, fc1, grouped=grouped)
        hidden = self._activation(hidden)
        # Same order and dtype handling as megatron's MLP: scale by the router probability after the activation.
        dtype = hidden.dtype
        hidden = (hidden * permuted_probs.unsqueeze(-1)).to(dtype)
        return grouped_linear(hidden, counts, fc2, grouped=grouped), None
