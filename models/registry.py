"""Build a recommendation model by name, with checked hyperparameters."""

from __future__ import annotations

import inspect
from typing import Any

from flax import nnx

from models.freedom import FREEDOM
from models.lightgcn import LightGCN, dataset_name
from models.vbpr import VBPR

_MODELS = {"lightgcn": LightGCN, "vbpr": VBPR, "freedom": FREEDOM}
MODEL_NAMES = tuple(_MODELS)


def hyperparameter_names(name: str) -> tuple[str, ...]:
    """Return the hyperparameters that model ``name`` accepts, in signature order."""
    model_class = _model_class(name)
    parameters = inspect.signature(model_class.__init__).parameters.values()
    return tuple(
        parameter.name
        for parameter in parameters
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name != "rngs"
    )


def _model_class(name: str) -> type[nnx.Module]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {list(MODEL_NAMES)}")
    return _MODELS[name]


def build_model(name: str, dataset: Any, *, rngs: nnx.Rngs, **hyperparams: Any) -> nnx.Module:
    """Build the model ``name`` for ``dataset``.

    Args:
      name: one of `MODEL_NAMES`.
      dataset: a `models.data.Dataset` or an object with the same fields.
      rngs: random streams for parameter initialisation.
      **hyperparams: model hyperparameters; omitted ones take the model's defaults.

    Returns:
      The initialised model.

    Raises:
      ValueError: for an unknown model or hyperparameter, an invalid hyperparameter value,
        or a model that needs item features on a dataset without them.
    """
    model_class = _model_class(name)
    allowed = hyperparameter_names(name)
    for key, value in hyperparams.items():
        if key not in allowed:
            raise ValueError(
                f"{name}: unknown hyperparameter {key}={value!r}; expected one of {list(allowed)}"
            )

    if model_class.uses_features and not dataset.features:
        raise ValueError(
            f"model {name!r} needs item features, but dataset {dataset_name(dataset)!r} has "
            f"none; load a dataset folder with at least one <modality>_feat.npy file"
        )
    return model_class(dataset, rngs=rngs, **hyperparams)
