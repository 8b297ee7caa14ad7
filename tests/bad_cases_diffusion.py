"""Bad-input cases of ``kdlab diffusion`` (see ``bad_case.py``): each refused while the recipe and
the arguments are checked, before anything is trained or written."""

from __future__ import annotations

from bad_case import C

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
]
