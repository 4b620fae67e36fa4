"""Code a spec names as "package.module:factory": a user's teacher or student family.

A spec naming a module runs that module's code, as `python -m` would: kdtune imports it from the working
directory or the installed packages, never from a study's artifact store. The module's source enters the
teacher's cache key and the students' records, so an edited module is never mistaken for the one that ran.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kdtune.spec import SpecError


def is_reference(name: str) -> bool:
    """Whether a spec value names user code ("package.module:factory") rather than a built-in."""
    return ":" in name


def factory(reference: str, key: str) -> Callable[..., nn.Module]:
    """The callable `reference` names; `key` is the spec key that named it, for the error messages."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise SpecError(f"{key} = {reference!r} must name a factory as \"package.module:function\".")
    if os.getcwd() not in sys.path:  # as `python -m` does: a module beside the spec is found from where kdtune runs
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    # the user's module may raise anything while it is imported; each is reported as one line naming it
    except Exception as error:
        raise SpecError(f"{key}: cannot import {module_name!r} ({type(error).__name__}: {error}); run kdtune from "
                        "the folder that holds it, or install it.") from error
    found = getattr(module, attribute, None)
    if not callable(found):
        raise SpecError(f"{key}: module {module_name!r} has no function {attribute!r}.")
    return found


def build(reference: str, key: str, *args, **kwargs) -> nn.Module:
    """The model the factory returns for these arguments, which must be a torch.nn.Module."""
    make = factory(reference, key)
    try:
        model = make(*args, **kwargs)
    except Exception as error:  # the user's factory, as on import
        raise SpecError(f"{key}: {reference}{args} raised {type(error).__name__}: {error}.") from error
    if not isinstance(model, nn.Module):
        raise SpecError(f"{key}: {reference} returned {type(model).__name__}, but must return a torch.nn.Module.")
    return model


def check_output(model: nn.Module, input_shape: tuple[int, ...], n_classes: int, reference: str, key: str) -> None:
    """A user's network must map a batch (N, *input_shape) to logits (N, n_classes): an ImageNet head of 1000
    would otherwise train without complaint and break every student after it. Checked on a batch of zeros, in
    eval mode, drawing nothing from the global RNG that seeds the students."""
    device = next(model.parameters(), torch.empty(0)).device
    training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            found = model.eval()(torch.zeros(2, *input_shape, device=device))
    except Exception as error:  # the user's forward pass, as on import
        raise SpecError(f"{key}: {reference} fails on a batch of shape {(2, *input_shape)} ({type(error).__name__}: "
                        f"{error}).") from error
    finally:
        model.train(training)
    shape = tuple(getattr(found, "shape", ()))
    if shape != (2, n_classes):
        raise SpecError(f"{key}: {reference} gives outputs of shape {shape or type(found).__name__} for a batch of 2, "
                        f"but must give logits of shape (2, {n_classes}): one per class of the data.")


def source_sha256(reference: str, key: str) -> str:
    """The sha256 of the source file of the module `reference` names."""
    module = inspect.getmodule(factory(reference, key))
    try:
        return hashlib.sha256(Path(inspect.getsourcefile(module)).read_bytes()).hexdigest()
    except (TypeError, OSError) as error:  # a module with no source file (compiled, frozen) cannot be keyed
        raise SpecError(f"{key}: cannot read the source of {reference} ({error}); kdtune keys caches by it.") \
            from error
