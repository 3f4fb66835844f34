"""Universal SANE: weight-space embeddings of models of any architecture."""

# Bases of the lineage benchmark; here, not in evaluate.py, so the CLI's defaults cost no numpy import.
LINEAGE_FAMILIES = ("tiny-gpt2", "tiny-gptneox", "tiny-qwen2", "tiny-mistral", "tiny-gemma", "tiny-bert")
LINEAGE_REAL = ("smollm2-135m", "minilm-l6")
