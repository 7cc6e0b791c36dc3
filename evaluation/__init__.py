"""Offline evaluation: the published retrieval protocols, with and without structural reranking."""
