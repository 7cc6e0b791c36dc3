"""The ``vit-rerank`` command line: index, search, serve, evaluate and benchmark."""

import os

__version__ = "0.1.0"

#: How torch's OpenMP worker threads wait between parallel regions, for every ``vit-rerank`` command
#: (read once, when torch is first imported; a value already in the environment is kept). libgomp's
#: default spins, which on a machine whose cores other processes also use makes every parallel region
#: wait for a worker that lost its core: measured on this project's 2-core machine beside two other busy
#: processes, one DINOv2 ViT-S/14 forward took 1.6 s spinning and 0.25-0.32 s passive; on the quiet
#: machine both take about 95 ms (docs/benchmarks.md, "A loaded machine").
OMP_WAIT_POLICY = "PASSIVE"
os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
