"""Fine-tuning the backbone on a labelled class folder (``vit-rerank train``).

One job per module: :mod:`.data` (labelled folder, held-out split, class-balanced sampler),
:mod:`.tokens` (the frozen blocks run once, their output tokens cached), :mod:`.model` (the
trainable last blocks), :mod:`.losses` (the pytorch-metric-learning losses on offer),
:mod:`.heldout` (held-out P@1 / MAP@R), :mod:`.checkpoint` (resumable state), :mod:`.loop`
(the epochs) and :mod:`.cli`.
"""
