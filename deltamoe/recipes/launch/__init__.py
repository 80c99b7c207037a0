"""Launch helpers: `python -m deltamoe.recipes.launch.args RECIPE` prints trainer flags (for Slurm scripts),
`python -m deltamoe.recipes.launch.local RECIPE [--dry-run]` runs one node with torchrun."""
