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
from sglang_wheel import serializer as wheel_serializer

from fapo_megatron.engine_protocol import SamplingParams
from fapo_megatron.engines.sglang import (
    SUPPORTED_SGLANG,
    SGLangEngine,
    SGLangServerArgs,
    memory_tags,
    pause_keeps_in_flight,
    pause_request,
)
from fapo_megatron.engines.sglang_transport import TensorTransport
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


def _function_source(path: Path, class_name: str, function: str) -> str:
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.AsyncFunctionDef | ast.FunctionDef) and item.name == function:
                    return ast.get_source_segment(source, item)
    raise LookupError(f"no {class_name}.{function} in {path}")


@pytest.mark.parametrize("version", VERSIONS)
def test_pause_keeps_in_flight_only_where_the_version_can(version):
    """Where the pause has no mode it aborts everything in flight, so the engine must drain before it."""
    pause = _function_source(srt(version, "managers/tokenizer_manager.py"), "TokenizerManager", "pause_generation")
    fields = class_fields(srt(version, "managers/io_struct.py"), "PauseGenerationReqInput")
    has_retract = fields is not None and "retract" in (_literal_values(fields["mode"]) or [])
    assert pause_keeps_in_flight(version) == has_retract
    assert "abort_request(abort_all=True)" in pause  # the default (or only) behaviour aborts
    if has_retract:
        assert 'obj.mode != "abort"' in pause  # ... which another mode avoids


def _cli_flags(version: str) -> set[str]:
    """The launch_server flags of a version: string literals in 0.5.3's server_args.py; from the field records of
    0.5.23's arg_groups/fields (arg_utils._field_to_cli_name: "--" + name with "-" for "_")."""
    server_args = srt(version, "server_args.py")
    files = [server_args, *sorted((server_args.parent / "arg_groups").glob("**/*.py"))]
    flags = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
                flags.add(node.value)
            if path.parent.name == "fields" and isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                flags.add("--" + node.target.id.replace("_", "-"))
    return flags


@pytest.mark.parametrize("version", VERSIONS)
def test_launch_flags_exist_in_the_version(version):
    args = SGLangServerArgs(
        model_path="m",
        enable_memory_saver=True,
        skip_tokenizer_init=True,
        enable_deterministic_inference=True,
        enable_weights_cpu_backup=True,
    )
    ours = {arg for arg in args.command() if arg.startswith("--")}
    assert {"--enable-deterministic-inference", "--enable-weights-cpu-backup"} <= ours
    assert ours <= _cli_flags(version), sorted(ours - _cli_flags(version))


@pytest.mark.parametrize("version", VERSIONS)
def test_payload_sampling_keys_are_accepted_by_the_version(version):
    rows = [(0, [3, 4]), (0, [3, 4]), (1, [5])]
    for params in (
        SamplingParams(max_new_tokens=4, stop=["\n"], seed=3),
        SamplingParams(max_new_tokens=4, top_k=5, top_p=0.9),
    ):
        payload = SGLangEngine._payload(rows, params)
        per_row = payload["sampling_params"]
        per_row = per_row if isinstance(per_row, list) else [per_row]
        keys = {key for sp in per_row for key in sp}
        assert keys <= sampling_param_keys(version), sorted(keys - sampling_param_keys(version))
    if version == "0.5.23":  # the request schema's top-level fields too
        request = class_fields(wheel_file(version, "api/v1/api_types.py"), "GenerateRequest")
        assert set(payload) <= set(request)
    else:
        assert set(payload) <= set(class_fields(srt(version, "managers/io_struct.py"), "GenerateReqInput"))
    assert sampling_param_keys("0.5.3") == init_arguments(
        srt("0.5.3", "sampling/sampling_params.py"), "SamplingParams"
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_one_payload_per_tp_rank_each_rebuilt_by_sglang(version):
    """tp_worker.py reads serialized_named_tensors[tp_rank]: every rank gets an entry of its own that the wheel's
    MultiprocessingSerializer and FlattenedTensorBucket turn back into the bucket."""
    worker = srt(version, "managers/tp_worker.py").read_text()
    assert any(f"serialized_named_tensors[{rank}]" in worker for rank in ("self.tp_rank", "get_parallel().tp_rank"))
    module_spec = importlib.util.spec_from_file_location(
        f"sglang_tensor_bucket_tp_{version}", srt(version, "weight_sync/tensor_bucket.py")
    )
    tensor_bucket = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(tensor_bucket)
    serializer = wheel_serializer(version)
    generator = torch.Generator().manual_seed(1)
    bucket = [("w", torch.randn(4, 3, generator=generator)), ("b", torch.randn(5, generator=generator))]
    transport = TensorTransport(client=None, tp_size=3, rank_devices=[torch.device("cpu")] * 3)
    ((flat, metadata),) = flatten_bucket(bucket)
    entries, copies = transport.payloads(flat, metadata)
    assert len(entries) == 3 and len(copies) == 3
    for entry in entries:
        payload = serializer.deserialize(entry)
        sglang_bucket = tensor_bucket.FlattenedTensorBucket(
            flattened_tensor=payload["flattened_tensor"], metadata=payload["metadata"]
        )
        rebuilt = dict(sglang_bucket.reconstruct_tensors())
        assert sorted(rebuilt) == ["b", "w"]
        assert all(torch.equal(rebuilt[name], want) for name, want in bucket)
