"""Reading the unpacked SGLang wheels (`make sglang-wheels`: .cache/sglang/<version>/) without importing them: what
drags in the GPU stack is parsed with `ast`. Shared by the contract tests and the stand-in server."""

import ast
from pathlib import Path

WHEELS = Path(__file__).resolve().parents[2] / ".cache" / "sglang"
VERSIONS = ["0.5.3", "0.5.23"]
"""The oldest and newest of SUPPORTED_SGLANG, the wheels unpacked for the tests."""


def wheel_file(version: str, relative: str) -> Path:
    """A file of the unpacked wheel, relative to its `sglang/` package."""
    path = WHEELS / version / "sglang" / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make sglang-wheels` (it unpacks the sglang {version} wheel)")
    return path


def class_fields(path: Path, class_name: str) -> dict[str, ast.expr] | None:
    """Field name -> annotation of a (data or msgspec) class in the wheel's source; None when it has no such class."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {
                item.target.id: item.annotation
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    return None


def init_arguments(path: Path, class_name: str) -> set[str]:
    """The keyword arguments of a class's __init__ in the wheel's source."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    return {a.arg for a in item.args.args + item.args.kwonlyargs} - {"self"}
    raise LookupError(f"no {class_name}.__init__ in {path}")


def sampling_param_keys(version: str) -> set[str]:
    """The /generate sampling_params keys a server of `version` accepts, from the nearest unpacked wheel: from 0.5.22
    the request schema sglang/api/v1/api_types.py SamplingParams ("unknown keys rejected", 400); before, the
    keyword arguments of srt/sampling/sampling_params.py SamplingParams (an unknown one raises TypeError, a 500)."""
    from packaging.version import Version

    if Version(version) >= Version("0.5.22"):
        return set(class_fields(wheel_file("0.5.23", "api/v1/api_types.py"), "SamplingParams"))
    return init_arguments(wheel_file("0.5.3", "srt/sampling/sampling_params.py"), "SamplingParams")


def serializer(version: str):
    """The wheel's own MultiprocessingSerializer (0.5.23: with its SafeUnpickler), its classes and helpers taken from
    srt/utils/common.py (a module that imports the GPU stack) and run beside the imports they use; the stdlib's base64
    stands in for pybase64, which has the same b64encode/b64decode."""
    import base64
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler
    from typing import Union

    import torch

    path = wheel_file(version, "srt/utils/common.py")
    source = path.read_text()
    tree = ast.parse(source)
    wanted = {"MultiprocessingSerializer", "SafeUnpickler", "_safe_load_torch_storage"}
    namespace = {
        "io": io, "pickle": pickle, "ForkingPickler": ForkingPickler, "pybase64": base64, "torch": torch,
        "Union": Union,
    }  # fmt: skip
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in wanted:
            exec(compile(ast.Module([node], []), str(path), "exec"), namespace)  # noqa: S102 - the wheel's code
    return namespace["MultiprocessingSerializer"]
