"""Callbacks: code that runs at fixed points of :class:`kdlab.train.trainer.Trainer`'s loop.

Subclass :class:`Callback` and override what you need; raise :class:`StopTraining` from
``on_epoch_end`` to end the run after the current epoch (it finishes normally: best checkpoint,
test metrics, ``result.json``). Any other exception propagates (e.g. ``optuna.TrialPruned``).
"""

from __future__ import annotations

from typing import Callable, Optional


class StopTraining(Exception):
    """Raised by a callback to end training after the current epoch."""


class Callback:
    def on_fit_start(self, trainer) -> None:
        """Before the first epoch (after a resume restored the state)."""

    def on_step_end(self, trainer, ctx) -> None:
        """After every training batch (after the optimiser step when one was taken)."""

    def on_epoch_end(self, trainer, row: dict) -> None:
        """After an epoch's validation and checkpoints; ``row`` is its metrics.csv row."""

    def on_fit_end(self, trainer, result: dict) -> None:
        """After ``result.json`` was written."""


class Announce(Callback):
    """Prints ``text`` once, when training starts: a command's header (``distilling ...``) comes
    after everything a bad input could fail on (recipe, data, teacher, run folder), so a refused
    input prints only its one error line. ``said`` tells whether it was printed."""

    def __init__(self, text: str, print_fn: Callable[[str], None] = print):
        self.text, self.print_fn, self.said = text, print_fn, False

    def on_fit_start(self, trainer) -> None:
        self.say()

    def say(self) -> None:
        if not self.said:
            self.said = True
            self.print_fn(self.text)


class EpochHook(Callback):
    """Calls ``fn(row)`` after every epoch (a quick way to watch or prune a run)."""

    def __init__(self, fn: Callable[[dict], Optional[bool]]):
        self.fn = fn

    def on_epoch_end(self, trainer, row: dict) -> None:
        if self.fn(row) is False:
            raise StopTraining


class ReapplyMasks(Callback):
    """Keeps pruned weights at zero: re-applies unstructured pruning keep-masks after every step
    (``masks``: parameter name -> 0/1 tensor, as :func:`kdlab.compress.prune` returns them)."""

    def __init__(self, model, masks: dict, apply: Callable):
        self.model, self.masks, self.apply = model, masks, apply

    def on_step_end(self, trainer, ctx) -> None:
        self.apply(self.model, self.masks)


SHORT_UNITS = {"images": "img", "tokens": "tok"}


def format_row(row: dict, epochs: int, unit: str = "images", undefined: dict | None = None) -> str:
    """One readable line for an epoch's metrics row; ``unit`` is what the throughput
    (``<unit>_per_s``) counts, the objective's ``sample_unit`` (shown as ``img/s``, ``tok/s``).
    ``undefined``: metric name -> the value that marks it undefined (the objective's
    ``undefined``, e.g. COCOeval's −1 for an AP size with no object): shown as ``n/a``."""
    parts = [f"epoch {int(row['epoch'])}/{epochs}"]
    speed = f"{unit}_per_s"
    skip = {"epoch", "train_time_s", speed, "lr"}
    undefined = undefined or {}
    for k, v in row.items():
        if k not in skip and isinstance(v, (int, float)):
            mark = undefined.get(k.split("_", 1)[1] if k.startswith(("val_", "test_")) else k)
            parts.append(f"{k} n/a" if mark is not None and v == mark else f"{k} {v:.4g}")
    parts.append(f"lr {row.get('lr', float('nan')):.3g}")
    parts.append(f"{row.get(speed, float('nan')):.0f} {SHORT_UNITS.get(unit, unit)}/s")
    parts.append(f"{row.get('train_time_s', float('nan')):.1f}s")
    return "  ".join(parts)


class LogFile(Callback):
    """Appends a line per epoch (and the start and the result) to ``<run>/train.log``."""

    def _write(self, trainer, line: str) -> None:
        if trainer.runtime.is_main:
            import time

            path = trainer.run_dir / "train.log"
            try:
                with open(path, "a") as f:
                    f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")
            except OSError as e:  # a full disk: name the file (the run's other files stay whole)
                raise OSError(e.errno, e.strerror, str(path)) from None

    def on_fit_start(self, trainer) -> None:
        self._write(trainer, f"start {trainer.method} seed {trainer.seed}: epoch {trainer.state.epoch} of "
                             f"{trainer.cfg.epochs} done; device {trainer.runtime.device}")

    def on_epoch_end(self, trainer, row: dict) -> None:
        self._write(trainer, format_row(row, trainer.cfg.epochs, trainer.unit,
                                        getattr(trainer.objective, "undefined", None)))

    def on_fit_end(self, trainer, result: dict) -> None:
        keys = [k for k in result if k.startswith(("val_", "test_"))] + ["best_epoch", "epochs_run"]
        self._write(trainer, "finished: " + "  ".join(f"{k} {result[k]}" for k in keys if k in result))


class ConsoleLines(Callback):
    """Prints one line per epoch to stderr (the console output when it is not a terminal)."""

    def on_epoch_end(self, trainer, row: dict) -> None:
        if trainer.runtime.is_main:
            import sys

            print(f"[{trainer.method} s{trainer.seed}] " + format_row(row, trainer.cfg.epochs, trainer.unit,
                                                                     getattr(trainer.objective, "undefined", None)),
                  file=sys.stderr, flush=True)


def step_scalars(trainer) -> dict:
    """The per-step scalars of the step just taken: the training loss of the batch (this process's,
    as the optimiser saw it) and the learning rate."""
    out = {"lr": float(trainer.opt.param_groups[0]["lr"])}
    loss = getattr(trainer, "step_loss", None)
    if loss is not None:
        out["loss"] = float(loss)
    return out


class TensorBoard(Callback):
    """Writes every metric of every epoch (loss terms, accuracies, lr, images/s) as TensorBoard
    scalars under ``<run>/tb`` (needs the ``tensorboard`` package), and each training batch's loss
    and learning rate (``step/loss``, ``step/lr``) at the global batch count, every ``every`` batches."""

    def __init__(self, every: int = 1):
        self.writer = None
        self.every = max(1, int(every))
        self.batches = 0

    def on_step_end(self, trainer, ctx) -> None:
        if self.writer is None:
            return
        self.batches += 1
        if self.batches % self.every == 0:
            for k, v in step_scalars(trainer).items():
                self.writer.add_scalar(f"step/{k}", v, self.batches)

    def on_fit_start(self, trainer) -> None:
        if not trainer.runtime.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("train.log_to includes tensorboard but the tensorboard package is missing: "
                              "pip install tensorboard (or kdlab[tensorboard])") from None
        self.writer = SummaryWriter(str(trainer.run_dir / "tb"))

    def on_epoch_end(self, trainer, row: dict) -> None:
        if self.writer is None:
            return
        step = int(row["epoch"])
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                group = "val" if "val_" in k else ("speed" if k in (f"{trainer.unit}_per_s", "train_time_s") else "train")
                self.writer.add_scalar(f"{group}/{k}", v, step)
        self.writer.flush()

    def on_fit_end(self, trainer, result: dict) -> None:
        if self.writer is not None:
            for k, v in result.items():
                if k.startswith("test_") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"test/{k}", v, 0)
            self.writer.close()
            self.writer = None


class MLflow(Callback):
    """Logs a run to MLflow (``train.log_to: [mlflow]``): parameters (the seed, method, epochs,
    optimiser settings), each batch's ``step_loss`` / ``step_lr`` at the global batch count, every
    epoch's metrics at the epoch number, and the test metrics at the end. The tracking store is
    ``$MLFLOW_TRACKING_URI`` when set, else a local file store ``<run>/mlruns``; the experiment is
    the method. Needs ``mlflow-skinny`` (``pip install kdlab[mlflow]``)."""

    def __init__(self, every: int = 1):
        self.ml = None
        self.every = max(1, int(every))
        self.batches = 0

    def on_fit_start(self, trainer) -> None:
        if not trainer.runtime.is_main:
            return
        import os

        try:
            import mlflow
        except ImportError:
            raise ImportError("train.log_to includes mlflow but the mlflow package is missing: "
                              "pip install mlflow-skinny (or kdlab[mlflow])") from None
        self.ml = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((trainer.run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(trainer.method or "kdlab")
        mlflow.start_run(run_name=f"{trainer.method or 'run'}-s{trainer.seed}")
        cfg = trainer.cfg
        params = {"seed": trainer.seed, "method": trainer.method, "run_dir": str(trainer.run_dir)}
        for k in ("epochs", "batch_size", "optimizer", "lr", "schedule", "weight_decay", "momentum"):
            if hasattr(cfg, k):
                params[k] = getattr(cfg, k)
        mlflow.log_params(params)

    def on_step_end(self, trainer, ctx) -> None:
        if self.ml is None:
            return
        self.batches += 1
        if self.batches % self.every == 0:
            self.ml.log_metrics({f"step_{k}": v for k, v in step_scalars(trainer).items()}, step=self.batches)

    def on_epoch_end(self, trainer, row: dict) -> None:
        if self.ml is None:
            return
        self.ml.log_metrics({k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))},
                            step=int(row["epoch"]))

    def on_fit_end(self, trainer, result: dict) -> None:
        if self.ml is not None:
            self.ml.log_metrics({k: float(v) for k, v in result.items()
                                 if k.startswith("test_") and isinstance(v, (int, float))})
            self.ml.end_run()
            self.ml = None
