"""DeltaMoE: add new languages to an existing LLM by upcycling to language experts and grafting the post-training delta."""

__version__ = "0.1.0"
