"""Our SGLang payloads run through SGLang's own code, from the real wheels of the oldest and newest supported version.

`make sglang-wheels` unpacks them (--no-deps, never installed) under .cache/sglang/<version>/. What imports on CPU
(weight_sync/tensor_bucket.py needs only torch) is loaded as a module from the wheel; what drags in the GPU stack
(srt/constants.py's package, managers/io_struct.py) is read from the wheel's source with `ast`.
"""

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from sglang_wheel import VERSIONS, class_fields, init_arguments, sampling_param_keys, wheel_file

from fapo_megatron.engine_protocol import SamplingParams
from fapo_megatron.engines.sglang import (
    SUPPORTED_SGLANG,
    SGLangEngine,
    SGLangServerArgs,
    memory_tags,
    pause_keeps_in_flight,
    pause_request,
)
from fapo_megatron.engines.weight_sync import flatten_bucket


def srt(version: str, relative: str) -> Path:
    try:
        return wheel_file(version, f"srt/{relative}")
    except FileNotFoundError as error:
        pytest.fail(str(error))


def test_tested_versions_are_the_supported_range():
    spec = SpecifierSet(SUPPORTED_SGLANG)
    assert all(v in spec for v in VERSIONS)
    assert str(spec) == ">=0.5.3,<=0.5.23" or set(map(str, spec)) == {">=0.5.3", "<=0.5.23"}


@pytest.mark.parametrize("version", VERSIONS)
def test_flattened_bucket_rebuilt_bit_exact_by_sglang(version):
    module_spec = importlib.util.spec_from_file_location(
        f"sglang_tensor_bucket_{version}", srt(version, "weight_sync/tensor_bucket.py")
    )
    tensor_bucket = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(tensor_bucket)
    generator = torch.Generator().manual_seed(0)
    bucket = [
        ("layer.0.weight", torch.randn(3, 5, generator=generator)),
        ("layer.0.bias", torch.randn(7, generator=generator).to(torch.bfloat16)),
        ("layer.1.weight", torch.randn(2, 4, generator=generator)),
        ("positions", torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4) * (1 << 40)),
        ("layer.1.bias", torch.randn(4, generator=generator).to(torch.bfloat16)),
    ]
    rebuilt = {}
    for flat, metadata in flatten_bucket(bucket):  # one push of mixed dtypes
        sglang_bucket = tensor_bucket.FlattenedTensorBucket(flattened_tensor=flat, metadata=metadata)
        rebuilt.update(sglang_bucket.reconstruct_tensors())
    assert sorted(rebuilt) == sorted(name for name, _ in bucket)
    for name, want in bucket:
        got = rebuilt[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), name  # bit-exact


def _module_constants(path: Path, prefix: str) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and any(isinstance(t, ast.Name) and t.id.startswith(prefix) for t in node.targets)
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_memory_tags_are_the_versions_gpu_memory_types(version):
    assert memory_tags(version) == _module_constants(srt(version, "constants.py"), "GPU_MEMORY_TYPE_")


def _literal_values(annotation: ast.expr) -> list | None:
    """The allowed values of a `Literal[...]` annotation, else None."""
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", None) == "Literal":
        elements = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        return [ast.literal_eval(e) for e in elements]
    return None


@pytest.mark.parametrize("version", VERSIONS)
def test_pause_body_fits_the_versions_request(version):
    body = pause_request(version)
    fields = class_fields(srt(version, "managers/io_struct.py"), "PauseGenerationReqInput")
    if fields is None:  # the endpoint reads no body in this version: send none
        assert body == {}
        return
    assert set(body) <= set(fields)
    for key, value in body.items():
        allowed = _literal_values(fields[key])
        assert allowed is None or value in allowed, (key, value, allowed)
    assert body.get("mode") == "retract"  # keeps in-flight requests instead of aborting them
