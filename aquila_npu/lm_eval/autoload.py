"""Plain ``lm_eval --model aquila-npu``: register the model the moment lm-eval fills its model registry.

lm-eval 0.4.13 finds third-party models only when they are imported; it fills its registry from
``lm_eval.models`` (lazy ``module:Class`` names) the first time a model is looked up. This module, imported by
``aquila_npu-autoload.pth`` when ``aquila-npu`` is on the command line, waits for ``lm_eval.models`` to be
imported and then adds ``aquila-npu`` to the same registry as one more lazy name. Nothing is imported before
lm-eval itself asks for its models, so other commands that happen to mention ``aquila-npu`` pay nothing more
than this finder.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from aquila_npu.lm_eval import MODEL_NAME, MODEL_TARGET

WATCHED = "lm_eval.models"


def register(registry) -> None:
    if MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != WATCHED:
            return None
        sys.meta_path.remove(self)  # once, and not while the real spec is looked up
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            from lm_eval.api.registry import model_registry

            register(model_registry)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if WATCHED in sys.modules:  # lm-eval imported already (e.g. this module imported late by hand)
        from lm_eval.api.registry import model_registry

        register(model_registry)
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
