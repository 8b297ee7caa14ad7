"""Bad-input cases of ``kdlab diffusion`` (see ``bad_case.py``): each refused while the recipe and
the arguments are checked, before anything is trained or written."""

from __future__ import annotations

from bad_case import C



def _diffusion_checkpoint(path, bases, steps=2):
    """A diffusion model file as a diffusion run writes it (tiny untrained denoiser; num_classes 0)."""
    import torch

    from kdlab.core.checkpoint import model_checkpoint
    from kdlab.tasks.diffusion_runs import make_net

    kw = {"channels": 4, "channel_mults": [1], "blocks": 1, "dropout": 0.0}
    ck = model_checkpoint(make_net("unet_lite", 1, kw), model_name="unet_lite", model_kwargs=kw, num_classes=0,
                          in_channels=1, dataset="digits",
                          diffusion={"logsnr_min": -20.0, "logsnr_max": 20.0, "prediction": "v", "steps": steps})
    torch.save(ck, path)


P, T = "diffusion/digits_progressive", "diffusion/digits_teacher"
O = "--out {t}/o --quiet"

CASES = [
    C("diffusion", "start steps not a power of two", f"diffusion train {P} --set distill.start_steps=48 {O}",
      "power of two"),
    C("diffusion", "end steps not a power of two", f"diffusion train {P} --set distill.end_steps=3 {O}",
      "power of two"),
    C("diffusion", "log-SNR range negative", f"diffusion train {T} --set schedule.logsnr_max=-20 {O}",
      "log-SNR range"),
    C("diffusion", "log-SNR range zero", f"diffusion train {T} --set schedule.logsnr_min=20 {O}",
      "log-SNR range"),
    C("diffusion", "unknown recipe key", f"diffusion train {T} --set train.lrr=1 {O}", "lrr"),
    C("diffusion", "recipe not found", f"diffusion train nosuch/recipe {O}", "nosuch"),
    C("diffusion", "study of a teacher recipe", f"diffusion study {T} --seeds 0 {O}", "distill"),
    C("diffusion", "unknown prediction", f"diffusion train {T} --set prediction=z {O}", "prediction"),
    C("diffusion", "recipe of another task", f"diffusion train digits/kd {O}", "diffusion"),
    C("diffusion", "profile a diffusion checkpoint", "profile {t}/best.pt --quiet", "kdlab diffusion study",
      files={"best.pt": _diffusion_checkpoint}),
    C("diffusion", "evaluate a diffusion checkpoint", "evaluate {t}/best.pt", "kdlab diffusion study",
      files={"best.pt": _diffusion_checkpoint}),
    C("diffusion", "export a diffusion checkpoint", "export {t}/best.pt --out {t}/m.onnx", "kdlab diffusion study",
      files={"best.pt": _diffusion_checkpoint}),
]
