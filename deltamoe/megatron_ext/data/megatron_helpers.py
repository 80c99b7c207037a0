"""The one place that turns off megatron-core's run-time compilation of its dataset helpers.

Megatron-LM's trainer (`megatron.training.initialize._compile_dependencies`) calls
`megatron.core.datasets.utils.compile_helpers()`, which runs `make` in megatron/core/datasets. The megatron-core wheel
ships the compiled extension (helpers_cpp.*.so) but no Makefile, so the call fails with "Failed to compile the C++
dataset helper functions" and the trainer exits, on GPU machines too (notes/megatron-on-cpu.md, gpu-measurements.md).
Building datasets directly (BlendedMegatronDatasetBuilder) never calls it. The trainer entry calls
`disable_dataset_helper_compilation()` once before `pretrain`; this may later move to the runtime compat module.
"""

from __future__ import annotations

from deltamoe.common.errors import DeltaMoEError


def _already_compiled() -> None:
    """Stand-in for compile_helpers: the helpers are imported (and so verified) when this is installed."""


def disable_dataset_helper_compilation() -> None:
    """Check the wheel's compiled dataset helpers import, then make `compile_helpers` a no-op. Idempotent."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as e:
        raise DeltaMoEError(
            f"megatron-core's compiled dataset helpers (megatron/core/datasets/helpers_cpp) do not import: {e}; "
            "reinstall megatron-core from its wheel for this Python version"
        ) from None
    import megatron.core.datasets.utils as dataset_utils

    dataset_utils.compile_helpers = _already_compiled
