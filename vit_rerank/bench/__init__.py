"""Benchmarks (``vit-rerank bench ...``): each puts the project beside its named peer in one run."""
