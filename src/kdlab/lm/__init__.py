"""Language-model distillation: corpora, tokenizers, small GPTs, divergences, the LM objective,
generation, the sparse teacher cache, sequence-level / on-policy KD and arithmetic reasoning traces.

See docs/lm.md. Submodules import torch; ``kdlab.lm`` itself imports nothing heavy.
"""
