"""Compression for deployment: pruning, quantization, ONNX export, and the deploy pipeline.

Submodules: :mod:`~kdlab.compress.prune`, :mod:`~kdlab.compress.quantize`,
:mod:`~kdlab.compress.export`, :mod:`~kdlab.compress.finetune`,
:mod:`~kdlab.compress.pipeline` (the ``deploy`` pipeline) and :mod:`~kdlab.compress.api`
(one function per command: profile, prune, quantize, export, deploy).

Compressed models are stored as ordinary kdlab model checkpoints
(:func:`kdlab.core.checkpoint.model_checkpoint`: state dict + registry name) with extra keys:

* ``pruned``: ``{"method", "sparsity" or "ratio", ..., "arch"}``; for structured pruning
  ``arch`` holds the constructor sizes of every Conv/Linear/norm layer, so the smaller network is
  rebuilt from the registry name and resized (no pickled code in the file);
* ``quantized``: ``{"kind": "fake", "weight_bits", "act_bits", ...}`` for a fake-quantized /
  quantization-aware trained model (the float weights plus the recorded activation ranges);
* ``input_shape``: ``[C, H, W]`` the model was measured with.

:func:`load_compressed` reads any of these (and ``.onnx`` files, returned as an ONNX Runtime
callable); :func:`save_compressed` writes them atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Image size of kdlab's data sets (for models loaded without data).
IMAGE_SIZES = {"digits": 8, "cifar10": 32, "cifar100": 32, "mnist5k": 28, "mnistidentities": 28,
               "mnistcanvas": 64}


def load_compressed(path: str | os.PathLike, device="cpu"):
    """Load a plain, pruned or fake-quantized checkpoint, or an ONNX file.

    Returns ``(model, checkpoint_dict)``; the model is in eval mode. For ``.onnx`` files the
    model is a :class:`kdlab.compress.export.OnnxModel` and the dict has ``format: "onnx"``.
    """
    from kdlab.core.checkpoint import CheckpointError, load_checkpoint
    from kdlab.models.adapters import load_model

    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from kdlab.compress.export import OnnxModel

        m = OnnxModel(path)
        return m, {"format": "onnx", "path": str(path), "input_shape": m.input_shape[1:]}
    ck = load_checkpoint(path)
    pruned = ck.get("pruned") or {}
    quant = ck.get("quantized") or {}
    if not pruned.get("arch") and not quant:
        return load_model(path, device)

    from kdlab.models import create_model

    for key in ("model_name", "num_classes", "in_channels"):
        if key not in ck:
            raise CheckpointError(f"checkpoint {path} lacks '{key}'; it is not a kdlab model file")
    model = create_model(ck["model_name"], num_classes=ck["num_classes"],
                         in_channels=ck["in_channels"], **ck.get("model_kwargs", {}))
    if pruned.get("arch"):
        from kdlab.compress.prune import apply_layer_specs

        apply_layer_specs(model, pruned["arch"])
    if quant:
        if quant.get("kind") != "fake":
            raise CheckpointError(f"checkpoint {path} has unknown quantization {quant.get('kind')!r}")
        from kdlab.compress.quantize import prepare_fake_quant, set_observing

        model = prepare_fake_quant(
            model, quant["weight_bits"], quant.get("act_bits"), per_channel=quant["per_channel"],
            weight_symmetric=quant["weight_symmetric"], act_symmetric=quant["act_symmetric"],
            inplace=True)
        set_observing(model, False)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit model {ck['model_name']} "
                              f"after rebuilding: {first}") from None
    return model.to(device).eval(), ck


def evaluate_model_file(path: str | os.PathLike, **kwargs) -> dict:
    """:func:`kdlab.evaluate.accuracy.evaluate_checkpoint` of any model file the pipeline makes: a
    plain, structurally pruned or quantized checkpoint, or an fp32 / int8 ONNX file (ONNX files record
    no data set: give ``dataset``; the images are normalised with the data set's mean and std)."""
    from kdlab.evaluate.accuracy import evaluate_checkpoint

    if Path(path).suffix == ".pt" and Path(path).is_file():
        from kdlab.core.checkpoint import load_checkpoint
        from kdlab.evaluate.detection_robustness import evaluate_detection_file, is_detection_checkpoint

        if is_detection_checkpoint(load_checkpoint(path)):  # a detector: COCO mAP on its recipe's own split
            from kdlab.core.device import resolve_device

            return evaluate_detection_file(path, split=kwargs.get("split", "test"), dataset=kwargs.get("dataset"),
                                           data_dir=kwargs.get("data_dir"),
                                           device=resolve_device(kwargs.get("device", "auto")))
    return evaluate_checkpoint(path, load=load_compressed, **kwargs)


def save_compressed(model, path: str | os.PathLike, base: dict, **extra) -> Path:
    """Write ``model`` as a kdlab checkpoint with the identity (name, kwargs, classes, dataset)
    of ``base`` (the checkpoint it was derived from); its ``pruned``/``quantized``/``input_shape``
    keys are carried over unless given in ``extra``."""
    from kdlab.core.checkpoint import atomic_save, model_checkpoint

    carried = {k: base[k] for k in ("pruned", "quantized", "input_shape") if k in base}
    carried.update(extra)
    ck = model_checkpoint(model, model_name=base["model_name"],
                          model_kwargs=base.get("model_kwargs", {}),
                          num_classes=base["num_classes"], in_channels=base["in_channels"],
                          dataset=base.get("dataset", ""), **carried)
    return atomic_save(ck, path)


def input_shape_of(ck: dict, image_size: int | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` for a checkpoint: ``image_size`` if given, else its ``input_shape`` key,
    else the image size its recipe trained at (``data.image_size``, e.g. a detection or face
    recipe's [H, W]), else its data set's image size (32 when unknown)."""
    if image_size is None and ck.get("input_shape"):
        return tuple(int(v) for v in ck["input_shape"])
    c = int(ck.get("in_channels", 3))
    if image_size is None:
        data = (ck.get("recipe") or {}).get("data") if isinstance(ck.get("recipe"), dict) else None
        size = (data or {}).get("image_size") or ((data or {}).get("kwargs") or {}).get("image_size")
        if size:
            hw = [int(v) for v in (size if isinstance(size, (list, tuple)) else (size, size))]
            return (c, hw[0], hw[-1])
        name = str(ck.get("dataset") or (data or {}).get("name") or "")
        image_size = IMAGE_SIZES.get(name.lower().replace("-", ""), 32)
    return (c, int(image_size), int(image_size))


__all__ = ["load_compressed", "save_compressed", "input_shape_of", "IMAGE_SIZES"]
