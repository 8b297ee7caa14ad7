"""Forward hooks that record the outputs of named submodules, without editing the model."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class Taps:
    """Record outputs of named submodules during forward passes.

    >>> with Taps(model, ["layer3"]) as taps:
    ...     logits = model(x)
    ...     feat = taps["layer3"]

    Outputs keep their autograd graph. ``detach=True`` stores detached tensors instead.
    A name the model does not have fails at once, listing the names it does have.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], detach: bool = False):
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            known = [n for n in modules if n and "." not in n]
            raise KeyError(
                f"{type(model).__name__} has no layer(s) {missing}; top-level layers are {known}"
            )
        self._modules = {n: modules[n] for n in self.names}

    def _hook(self, name):
        def fn(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.outputs[name] = output.detach() if self.detach else output

        return fn

    def attach(self) -> "Taps":
        if not self._handles:
            for n, m in self._modules.items():
                self._handles.append(m.register_forward_hook(self._hook(n)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.outputs = {}

    def __enter__(self) -> "Taps":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.outputs:
            raise KeyError(f"layer '{name}' produced no output in the last forward pass")
        return self.outputs[name]

    def __contains__(self, name: str) -> bool:
        return name in self.outputs
