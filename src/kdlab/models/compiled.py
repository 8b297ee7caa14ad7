"""``train.compile``: a model run through ``torch.compile``, or as it is when it cannot be.

:class:`Compiled` is called like the model. ``torch.compile`` compiles lazily, on the first call;
that first call's seconds are the *warm-up* (``warmup_s``: tracing and code generation, plus the
call itself), which ``result.json`` reports separately as ``compile_warmup_s``. When compiling
fails (no C++ compiler for the CPU backend, an operation the compiler does not support, ...), the
model runs eagerly from then on and one line on stderr says why (``fallback``).
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import torch
from torch import nn


class Compiled:
    """``model`` compiled on first use, falling back to eager with one line (see module doc)."""

    def __init__(self, model: nn.Module, what: str = "model"):
        self.eager = model
        self.what = what
        self.fallback: Optional[str] = None
        self.warmup_s = 0.0
        self._calls = 0
        try:
            self.compiled = torch.compile(model)
        except Exception as e:  # noqa: BLE001 - torch.compile unavailable on this build/platform
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        self.compiled = None
        self.fallback = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        print(f"kdlab: {self.what} not compiled ({self.fallback}); it runs eagerly", file=sys.stderr)

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        first = self._calls == 0
        t0 = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a compile error surfaces on the first calls
            if self._calls > 0 and not _is_compile_error(e):
                raise
            self._fail(e)
            return self.eager(*args, **kwargs)
        self._calls += 1
        if first:
            self.warmup_s += time.perf_counter() - t0
        return out

    def __getattr__(self, name):  # ``train()``, ``eval()``, ``parameters()`` ... of the model
        return getattr(self.eager, name)


def _is_compile_error(e: Exception) -> bool:
    mod = type(e).__module__
    return mod.startswith("torch._dynamo") or mod.startswith("torch._inductor")
