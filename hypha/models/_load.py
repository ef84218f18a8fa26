"""Model specs (:func:`load_model`) and the parameter groups and order of a model (see
:mod:`hypha.models`)."""

from __future__ import annotations

import importlib
import re
from types import MappingProxyType
from typing import Any, Final

import torch
from torch import nn

from hypha.models.gpt import GPT, GPTConfig

__all__ = ["GPT_SIZES", "ModelSpecError", "load_model", "parameter_groups", "training_parameters"]

#: The sizes of the built-in GPT: ``"gpt:<size>"``.
GPT_SIZES: Final = MappingProxyType({
    # for tests: 26,016 parameters
    "tiny": GPTConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, context=32),
    # bench/convergence.py's model: 867,072 parameters
    "default": GPTConfig(d_model=128, n_layers=4, n_heads=4, d_ff=512, context=64),
    # a GPU-sized demo: 10,942,464 parameters; context 256, prepare's default sequence length
    "small": GPTConfig(d_model=384, n_layers=6, n_heads=6, d_ff=1536, context=256),
})

_DOTTED: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class ModelSpecError(ValueError):
    """A model spec that cannot be loaded: malformed, or naming something that is not there or
    does not make a model."""


def load_model(spec: str, **kwargs: Any) -> nn.Module:
    """The model that ``spec`` names (see :mod:`hypha.models`), built with ``kwargs``.

    Seed torch's generator (``torch.manual_seed``) first for a reproducible initialisation.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"a model spec must be a non-empty string, got {spec!r}")
    name, colon, rest = spec.partition(":")
    if name == "gpt":
        size = rest if colon else "default"
        config = GPT_SIZES.get(size)
        if config is None:
            raise ModelSpecError(f"model spec {spec!r}: no GPT size {size!r}; choose from "
                                 + ", ".join(f"'gpt:{s}'" for s in GPT_SIZES))
        try:
            return GPT(config, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ModelSpecError(f"model spec {spec!r}: {exc}") from None
    if not colon or not _DOTTED.fullmatch(name) or not _DOTTED.fullmatch(rest):
        raise ModelSpecError(
            f"model spec {spec!r} is neither a built-in model ('gpt', "
            + ", ".join(f"'gpt:{s}'" for s in GPT_SIZES)
            + ") nor 'package.module:factory' (dotted Python names)")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise ModelSpecError(f"model spec {spec!r}: no module named {exc.name!r} (is it "
                                 "installed, or in the job's work directory?)") from None
        raise ModelSpecError(f"model spec {spec!r}: importing {name!r} failed: {exc}") from exc
    except Exception as exc:
        raise ModelSpecError(f"model spec {spec!r}: importing {name!r} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
    factory: Any = module
    for i, part in enumerate(rest.split(".")):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            where = name if i == 0 else f"{name}:{'.'.join(rest.split('.')[:i])}"
            raise ModelSpecError(f"model spec {spec!r}: {where} has no attribute {part!r}"
                                 ) from None
    if not callable(factory):
        raise ModelSpecError(f"model spec {spec!r}: {rest} is a {type(factory).__name__}, not "
                             "a callable that makes a model")
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelSpecError(f"model spec {spec!r}: {rest}(**{kwargs!r}) failed: "
                             f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: {rest}() returned a "
                             f"{type(model).__name__}, not a torch.nn.Module")
    loss = getattr(model, "loss", None)
    if loss is not None and not callable(loss):
        raise ModelSpecError(f"model spec {spec!r}: the model's 'loss' is a "
                             f"{type(loss).__name__}; it must be a method loss(x, y) or absent")
    if not any(True for _ in model.parameters()):
        raise ModelSpecError(f"model spec {spec!r}: the model has no parameters to train")
    return model


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The inner optimizer's parameter groups for ``model``: its ``param_groups(weight_decay)``
    when it has that method (checked: a list of dicts whose ``"params"`` hold each trainable
    parameter once), else one group of every parameter that requires a gradient."""
    method = getattr(model, "param_groups", None)
    if method is None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no parameters that require a gradient")
        return [{"params": trainable, "weight_decay": weight_decay}]
    groups = method(weight_decay)
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"{type(model).__name__}.param_groups() must return a non-empty list of "
                         f"dicts, got {type(groups).__name__}")
    seen: set[int] = set()
    for i, group in enumerate(groups):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(isinstance(p, torch.Tensor) for p in params):
            raise ValueError(f"{type(model).__name__}.param_groups()[{i}] must be a dict with "
                             "'params': a list of the model's parameters")
        for p in params:
            if not isinstance(p, nn.Parameter) and not p.requires_grad:
                raise ValueError(f"{type(model).__name__}.param_groups()[{i}] holds a tensor "
                                 "that is not a trainable parameter")
            if id(p) in seen:
                raise ValueError(f"{type(model).__name__}.param_groups() lists a parameter "
                                 "twice")
            seen.add(id(p))
    missing = [name for name, p in model.named_parameters() if p.requires_grad
               and id(p) not in seen]
    if missing:
        raise ValueError(f"{type(model).__name__}.param_groups() leaves out trainable "
                         f"parameter(s) {', '.join(missing[:5])}")
    if not seen:
        raise ValueError(f"{type(model).__name__}.param_groups() holds no parameters")
    return groups


def training_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters that DiLoCo trains, in its order: those of :func:`parameter_groups`, group
    by group. A parameter server lays out its global model in this order."""
    return [p for group in parameter_groups(model, 0.0) for p in group["params"]]
