"""Training data: text/JSONL -> Megatron indexed datasets with a language tag (prepare.py, language_tag.py), and
language-tagged blends whose samples carry lang_id and the original-language mask F(t) (blend.py)."""
