"""Text and activations, shared by ``sae``, ``align`` and ``restore``.

``corpus`` turns a text source (the built-in corpus, .txt, .jsonl, .parquet, a ``datasets`` folder)
into fixed-length token contexts; ``activations`` hooks module paths of any model, runs the corpus
through it and yields (or caches to disk) shuffled token activations.
"""
