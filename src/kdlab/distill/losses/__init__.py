"""Loss terms, one module per family, registered by name in LOSSES.

Import order registers the families; a recipe names terms with ``term: <name>``.
"""

from kdlab.distill.losses.base import LOSSES, BatchRecord, LossTerm, layer_pairs, register_loss
from kdlab.distill.losses import response, attention, dkd, feature, relation, contrastive, faces, detection  # noqa: F401  (registers the terms)
from kdlab.distill.losses import dist, mlkd, reviewkd, vid, cc, hmat, tv_detection  # noqa: F401  (part two: one file per method)
from kdlab.distill.losses.response import kd_loss
from kdlab.distill.losses.attention import attention_pair, spatial_attention

__all__ = ["LOSSES", "BatchRecord", "LossTerm", "register_loss", "layer_pairs", "build_terms",
           "kd_loss", "attention_pair", "spatial_attention"]


def build_terms(term_cfgs) -> list[tuple[str, float, LossTerm]]:
    """[(name, weight, module)] from a recipe's ``loss`` list. A term listed more than once (``kd``
    at two temperatures) gets distinct names, ``kd``, ``kd#2``, ..., so each has its own log column."""
    out = []
    seen: dict[str, int] = {}
    for cfg in term_cfgs:
        cls = LOSSES.get(cfg.term)
        seen[cfg.term] = seen.get(cfg.term, 0) + 1
        name = cfg.term if seen[cfg.term] == 1 else f"{cfg.term}#{seen[cfg.term]}"
        out.append((name, float(cfg.weight), cls(**cfg.params)))
    return out
