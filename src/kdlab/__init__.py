"""kdlab: knowledge distillation with honest measurements.

``kdlab.fit(student, teacher, train_data=..., val_data=...)`` distils any model on any data;
``kdlab.fit_recipe("digits/kd")`` runs a recipe. Both are imported lazily (``import kdlab`` is cheap).
"""

from kdlab.version import __version__  # noqa: F401


def fit(*args, **kwargs):
    from kdlab.api import fit as _fit

    return _fit(*args, **kwargs)


def fit_recipe(*args, **kwargs):
    from kdlab.api import fit_recipe as _fit_recipe

    return _fit_recipe(*args, **kwargs)


fit.__doc__ = "Distil any nn.Module on any data; see :func:`kdlab.api.fit`."
fit_recipe.__doc__ = "Train a recipe; see :func:`kdlab.api.fit_recipe`."
