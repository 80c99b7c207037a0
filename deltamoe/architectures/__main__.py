"""Print every architecture's config.json table as Markdown: `python -m deltamoe.architectures [llama|qwen2|qwen3]`."""

import sys

from deltamoe.architectures import ARCHITECTURES
from deltamoe.architectures.fields import Role, describe

names = sys.argv[1:] or list(ARCHITECTURES)
for name in names:
    table = ARCHITECTURES[name].config_table
    counts = ", ".join(f"{sum(f.role is r for f in table)} {r.value}" for r in Role)
    print(f"## {name} ({ARCHITECTURES[name].hf_architectures[0]}): {counts}\n\n{describe(table)}\n")
