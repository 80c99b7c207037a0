"""DeltaMoE: add new languages to an existing LLM by upcycling to language experts and grafting the post-training delta."""

__version__ = "0.1.0"

# Before torch or megatron-core are imported by anything of ours: their known, harmless warnings stay out of the logs
# (deltamoe/common/quiet.py lists each one; DELTAMOE_VERBOSE=1 or `deltamoe --verbose` shows everything).
from deltamoe.common import quiet as _quiet  # noqa: E402

_quiet.install()
