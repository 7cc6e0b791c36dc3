"""Gallery indexing: where the images come from, and decoding them robustly."""
