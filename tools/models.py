"""Model loading for the command line: MODEL specs, ``--input`` shapes and example inputs.

A MODEL spec is one of:

- ``torchvision:NAME``: a torchvision model with random weights (``weights=None``);
- ``path/to/file.py:factory``: the nn.Module that ``factory()`` in that file returns;
- ``path/to/model.pt`` (or ``.pth``): an nn.Module saved whole with ``torch.save(module, path)``;
  loading it unpickles, which runs code from the file: load only files you trust;
- ``path/to/model.pt2``: a ``torch.export`` program saved with ``torch.export.save``;
- nothing (``None``): the bundled example network of :mod:`hant.tools.examples`.

It also holds the argparse helpers that model-taking subcommands share
(:func:`add_model_arguments`, :func:`model_and_inputs`, :func:`trace_for_cli`).

Every failure a user can cause raises :class:`hant.errors.InputError` with a message that
says what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import uuid
from dataclasses import dataclass

import torch
import torch.nn as nn

from hant.errors import ExportError, HantError, InputError
from hant.graphs import trace
from hant.tools.examples import EXAMPLE_INPUT_SHAPE, example_network

__all__ = ["LoadedModel", "load_model", "parse_shape", "make_inputs", "add_model_arguments", "model_and_inputs",
           "trace_for_cli", "DTYPES", "MODEL_SPEC_HELP"]

MODEL_SPEC_HELP = ("torchvision:NAME (random weights), digits:mobilenet|resnet (the bundled trained teachers), "
                   "path/to/file.py:factory, a torch.save'd module (.pt) "
                   "or a torch.export program (.pt2); omit it for the bundled example network")

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class LoadedModel:
    """A loaded model, a display name, and the input shapes it is known to take (if any)."""
    module: nn.Module
    name: str
    input_shapes: tuple[tuple[int, ...], ...] | None = None


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (``x`` also separates) -> ``(1, 3, 224, 224)``; every size a positive integer."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"bad input shape {text!r}: give positive integers separated by commas, e.g. 1,3,224,224")
    return shape


def make_inputs(shapes, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One random normal tensor per shape, drawn from ``seed`` (the global RNG is not touched)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes)


def _torchvision(name: str) -> LoadedModel:
    try:
        import torchvision
    except ImportError as exc:
        raise InputError(f"torchvision:{name} needs torchvision; install it (pip install torchvision)") from exc
    known = torchvision.models.list_models()
    if name not in known:
        raise InputError(f"unknown torchvision model {name!r}; known: {', '.join(known)}")
    return LoadedModel(torchvision.models.get_model(name, weights=None).eval(), f"torchvision:{name}")


def _digits(name: str) -> LoadedModel:
    from hant.tools import digits

    return LoadedModel(digits.teacher(name), f"digits:{name}", (digits.INPUT_SHAPE,))


def _from_factory(path: str, factory_name: str) -> LoadedModel:
    if not os.path.isfile(path):
        raise InputError(f"model file {path!r} not found; give path/to/file.py:factory")
    if not factory_name.isidentifier():
        raise InputError(f"bad factory name {factory_name!r} in model spec; give path/to/file.py:factory")
    module_name = f"_hant_user_model_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    source = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = source  # pickling, dataclasses and typing look the module up by name
    try:
        spec.loader.exec_module(source)
    except Exception as exc:
        del sys.modules[module_name]
        raise InputError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(source, factory_name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(source).items() if callable(v) and not n.startswith("_"))
        raise InputError(f"{path} has no function {factory_name!r}; callables there: {', '.join(found) or 'none'}")
    try:
        model = factory()
    except Exception as exc:
        raise InputError(f"{path}:{factory_name}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise InputError(f"{path}:{factory_name}() returned {type(model).__name__}, not an nn.Module")
    return LoadedModel(model.eval(), f"{os.path.basename(path)}:{factory_name}")


def _from_pt(path: str) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # a whole module is a pickle
    except Exception as exc:
        raise InputError(f"could not load {path} with torch.load: {type(exc).__name__}: {exc}. "
                         "Save the module with torch.save(model, path) and keep its class importable") from exc
    if isinstance(obj, dict):
        raise InputError(f"{path} holds a state_dict, not a module; save the module itself (torch.save(model, path)) "
                         "or give path/to/file.py:factory that builds it and loads the weights")
    if not isinstance(obj, nn.Module):
        raise InputError(f"{path} holds a {type(obj).__name__}, not an nn.Module")
    return LoadedModel(obj.eval(), os.path.basename(path))


def _from_pt2(path: str) -> LoadedModel:
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise InputError(f"could not load {path} with torch.export.load: {type(exc).__name__}: {exc}. "
                         "Save the program with torch.export.save(torch.export.export(model, args), path)") from exc
    shapes = None
    if program.example_inputs is not None:
        args, kwargs = program.example_inputs
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            shapes = tuple(tuple(a.shape) for a in args)
    return LoadedModel(program.module(), os.path.basename(path), shapes)


def load_model(spec: str | None) -> LoadedModel:
    """The model a MODEL spec names (see the module docstring), in eval mode, on the CPU.

    ``None`` or ``""`` gives the bundled example network. Raises :class:`InputError` for
    unknown names, missing files and files that do not hold a module.
    """
    if not spec:
        return LoadedModel(example_network(), "example", (EXAMPLE_INPUT_SHAPE,))
    if spec.startswith("torchvision:"):
        return _torchvision(spec.partition(":")[2])
    if spec.startswith("digits:"):
        return _digits(spec.partition(":")[2])
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py"):
        return _from_factory(head, tail)
    if spec.endswith(".py"):
        raise InputError(f"{spec!r} names a file but no factory; give {spec}:factory_function")
    if spec.endswith((".pt", ".pth", ".pt2")):
        if not os.path.isfile(spec):
            raise InputError(f"model file {spec!r} not found")
        return _from_pt2(spec) if spec.endswith(".pt2") else _from_pt(spec)
    raise InputError(f"cannot read model spec {spec!r}; give {MODEL_SPEC_HELP}")


def positive_int(text: str) -> int:
    """argparse type: a positive integer, else a usage error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add MODEL, ``--input`` and ``--dtype``, the arguments every model-taking subcommand shares."""
    parser.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_SPEC_HELP)
    parser.add_argument("--input", action="append", metavar="SHAPE", dest="input_shapes",
                        help="example input shape, e.g. 1,3,224,224; repeat for models with several inputs "
                             "(default: the shapes the model is known to take, for the example and .pt2 files)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the model and its random example inputs (default float32)")


def model_and_inputs(args: argparse.Namespace) -> tuple[LoadedModel, tuple[torch.Tensor, ...]]:
    """Load ``args.model`` and build random inputs of ``args.input_shapes`` in ``args.dtype``.

    Shapes are parsed before the model loads, so a typo fails fast. Without ``--input`` the
    model's known shapes are used; when it has none, :class:`InputError` asks for ``--input``.
    """
    shapes = tuple(parse_shape(s) for s in args.input_shapes) if args.input_shapes else None
    loaded = load_model(args.model)
    shapes = shapes or loaded.input_shapes
    if shapes is None:
        raise InputError(f"{loaded.name} needs an input shape: add --input, e.g. --input 1,3,224,224")
    dtype = DTYPES[args.dtype]
    loaded.module.to(dtype)
    return loaded, make_inputs(shapes, dtype)


def trace_for_cli(module: nn.Module, inputs: tuple[torch.Tensor, ...]):
    """``hant.trace(module, inputs)``, holding back what torch prints to stderr while it tries.

    When capture fails, torch.export prints its partial graph and log lines to stderr before
    hant's :class:`TraceError` (which names the failing line and the fix) says it all in one
    message; that noise is dropped. When capture succeeds, whatever was printed (the model's own
    warnings, say) is passed on to stderr unchanged.
    """
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            return trace(module, inputs)
    except HantError:
        held = io.StringIO()  # the error says it all
        raise
    finally:
        sys.stderr.write(held.getvalue())


OUTPUT_SUFFIXES = (".onnx", ".pt", ".pt2")


def save_module(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: str) -> str:
    """Write ``module`` in the format the suffix of ``path`` names; return a line saying what was written.

    ``.onnx``: exported, simplified and checked with onnxruntime (:func:`hant.graphs.export.export_onnx`);
    ``.pt2``: a ``torch.export`` program; ``.pt``: ``torch.save`` of the module.
    """
    from hant.graphs.export import export_onnx

    if not path.endswith(OUTPUT_SUFFIXES):
        raise InputError(f"{path!r}: the suffix picks the format; use one of {', '.join(OUTPUT_SUFFIXES)}")
    try:
        if path.endswith(".onnx"):
            result = export_onnx(module, inputs, path)
            return f"{path} (ONNX, onnxruntime max relative error {result.max_error:.2e})"
        if path.endswith(".pt2"):
            try:
                program = torch.export.export(module, inputs)
            except Exception as exc:
                raise ExportError(f"torch.export failed on the module: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0]}; save it as .pt or .onnx instead") from exc
            torch.export.save(program, path)
            return f"{path} (torch.export program)"
        torch.save(module, path)
        return f"{path} (torch.save of the module; load with torch.load(path, weights_only=False))"
    except OSError as exc:
        raise InputError(f"cannot write {path!r}: {exc.strerror or exc}") from exc
