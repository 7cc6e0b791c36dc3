"""The ``vit-rerank`` command line: index, search, serve, evaluate and benchmark."""

__version__ = "0.1.0"
