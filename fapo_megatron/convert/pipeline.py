"""HF checkpoint <-> megatron-core distributed checkpoint, streamed tensor by tensor, with a parity gate.

hf-to-megatron: read HF safetensors lazily -> fused megatron tensors (models/hf_mapping), each made when the
checkpoint writer reaches it (megatron/streaming_checkpoint.py: the layout of a meta-device TP=1/PP=1 model, the
source dtype; the model is never in memory) -> megatron-core distributed checkpoint (reshardable to the target
TP/PP; vocab padded for the target TP). The folder also gets `hf/` (config, generation config, tokenizer) so export
needs no other input.
megatron-to-hf: load the checkpoint (a folder or a training root with `latest`) one decoder layer at a time -> HF
tensors -> sharded safetensors + index (memory: one output shard plus one layer).
Outputs are written to `<out>.partial` and renamed when complete.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fapo_megatron.convert import hf_io, megatron_io, parity
from fapo_megatron.megatron import checkpoint_files
from fapo_megatron.models import hf_mapping
from fapo_megatron.models.spec import model_spec

HF_SUBDIR = "hf"
META_NAME = checkpoint_files.META
DIST_METADATA = "metadata.json"
"""megatron-core's index of a distributed checkpoint folder."""
# HF tensors that carry no weights (recomputed buffers) and are skipped on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class ParityError(RuntimeError):
    """The converted model does not compute what its source computes; the report names the first bad layer."""

    def __init__(self, report: parity.ParityReport):
        super().__init__("; ".join(report.failures))
        self.report = report


@dataclass(frozen=True)
class ConversionResult:
    out_dir: Path
    bytes_moved: int
    seconds: float
    parity: parity.ParityReport | None

    @property
    def mb_per_s(self) -> float:
        return self.bytes_moved / 1e6 / max(self.seconds, 1e-9)


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


def _prepare_out(out_dir: Path) -> Path:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output folder {out_dir} exists and is not empty")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _finish_out(partial: Path, out_dir: Path) -> None:
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)


def mapping_spec_for(cfg: dict, *, tp: int, pp: int, divisible_by: int) -> hf_mapping.MappingSpec:
    """The mapping of an HF config under target TP/PP (vocabulary padded to lcm(divisible_by, tp)); raises naming
    what does not divide."""
    model = model_spec(cfg)
    spec = hf_mapping.MappingSpec(model, model.padded_vocab_size(tp, divisible_by))
    spec.check_tp(tp)
    hf_mapping.pp_layer_range(model.num_layers, pp, 0)
    return spec


def check_hf_names(reader: hf_io.HFReader, spec: hf_mapping.MappingSpec) -> None:
    """Every tensor the config implies exists, and the checkpoint holds nothing the mapping would drop."""
    needed = {name for m in hf_mapping.build_mappings(spec) for name in m.hf_names}
    missing = sorted(needed - set(reader.weight_map))
    if missing:
        raise hf_io.CheckpointError(f"{reader.folder}: tensors required by config.json are missing: {missing[:5]}")
    extra = set(reader.weight_map) - needed
    if spec.model.tie_embeddings:
        extra.discard("lm_head.weight")  # a tied copy; megatron shares the embedding
    extra = sorted(n for n in extra if not n.endswith(IGNORED_HF_SUFFIXES))
    if extra:
        raise hf_io.CheckpointError(f"{reader.folder}: tensors the mapping does not know (dropped): {extra[:5]}")


def _write_meta(folder: Path, hf_config: dict, source: Path, *, tp: int, pp: int) -> None:
    """meta.json in the actor checkpoint's layout (megatron/checkpoint.py), marked weights-only: step 0, no
    optimizer, scheduler or RNG state to restore."""
    meta = {
        "step": 0,
        "layout": {"tp": tp, "pp": pp, "dp": 1, "distributed_optimizer": False},
        "hf_config": hf_config,
        "weights_only": True,
        "converted_from": str(source),
    }
    (folder / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    torch.save({}, folder / "extra.pt")


def resolve_megatron_dir(path: str | Path) -> Path:
    """A checkpoint folder, or an actor checkpoint root (its newest complete step folder), with the checksums
    recorded at save verified."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"megatron checkpoint folder {path} not found")
    if not (path / DIST_METADATA).is_file():
        path = checkpoint_files.resolve_checkpoint(path)
    checkpoint_files.verify_checksums(path)
    return path


def _hf_config_of(ckpt_dir: Path, hf_config_from: str | Path | None) -> tuple[dict, Path | None]:
    """(HF config, folder to copy tokenizer files from): --hf-config-from, else CKPT/hf, else meta.json."""
    for folder in (Path(hf_config_from) if hf_config_from else None, ckpt_dir / HF_SUBDIR):
        if folder is not None and (folder / "config.json").is_file():
            return hf_io.read_config(folder), folder
    if hf_config_from:
        raise FileNotFoundError(f"--hf-config-from {hf_config_from}: config.json not found")
    if (ckpt_dir / META_NAME).is_file() and "hf_config" in json.loads((ckpt_dir / META_NAME).read_text()):
        return json.loads((ckpt_dir / META_NAME).read_text())["hf_config"], None
    raise FileNotFoundError(f"{ckpt_dir}: no HF config (no hf/config.json, no meta.json); pass --hf-config-from")


def hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    divisible_by: int = 128,
    thresholds: parity.ParityThresholds | None = parity.ParityThresholds(),
    progress: bool = True,
) -> ConversionResult:
    """Convert an HF checkpoint folder into a megatron-core distributed checkpoint for TP=tp, PP=pp."""
    import time

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    spec = mapping_spec_for(hf_io.read_config(hf_dir), tp=tp, pp=pp, divisible_by=divisible_by)
    reader = hf_io.HFReader(hf_dir)
    check_hf_names(reader, spec)
    partial = _prepare_out(out_dir)
    start = time.perf_counter()
    reader.bytes_read = 0
    finite_reads = _FiniteReads(reader)
    with _progress(reader.total_bytes(), "hf -> megatron", progress) as bar:
        megatron_io.save_from_hf(
            spec,
            finite_reads,
            partial,
            dtype=reader.dtype(),
            on_tensor=lambda *_: bar.update(reader.bytes_read - bar.n),
        )
    finite_reads.check()
    hf_io.copy_aux_files(hf_dir, partial / HF_SUBDIR)
    _write_meta(partial, hf_io.read_config(hf_dir), hf_dir, tp=tp, pp=pp)
    checkpoint_files.write_checksums(partial)
    _finish_out(partial, out_dir)
    seconds = time.perf_counter() - start
    report = None
    if thresholds is not None:
        report = check_parity(hf_dir, out_dir, spec, thresholds)
    return ConversionResult(out_dir, reader.bytes_read, seconds, report)


class _FiniteReads:
    """Reads HF tensors for the checkpoint writer and notes the first that holds NaN or inf (a converted checkpoint
    would carry them into training); the writer runs in threads, so the error is raised after it finishes."""

    def __init__(self, reader: hf_io.HFReader):
        self.reader = reader
        self.error: str | None = None

    def __call__(self, name: str) -> torch.Tensor:
        tensor = self.reader.get(name)
        if self.error is None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            where = self.reader.folder / self.reader.weight_map[name]
            self.error = f"{where}: tensor {name!r} has {bad} non-finite value(s)"
        return tensor

    def check(self) -> None:
        if self.error is not None:
            raise hf_io.CheckpointError(self.error)


def megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    hf_config_from: str | Path | None = None,
    thresholds: parity.ParityThresholds | None = parity.ParityThresholds(),
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
) -> ConversionResult:
    """Export a megatron-core distributed checkpoint as an HF folder (config and tokenizer from `hf_config_from`,
    default the checkpoint's own `hf/` folder)."""
    import time

    ckpt_dir, out_dir = resolve_megatron_dir(ckpt_dir), Path(out_dir)
    hf_config, config_dir = _hf_config_of(ckpt_dir, hf_config_from)
    padded_vocab, dtype = megatron_io.checkpoint_layout(ckpt_dir)
    spec = hf_mapping.MappingSpec(model_spec(hf_config), padded_vocab)
    partial = _prepare_out(out_dir)
    start = time.perf_counter()
    meta_model = megatron_io.build_model(spec, dtype=dtype, meta=True)
    total = sum(p.numel() * p.element_size() for p in meta_model.parameters())
    with _progress(total, "megatron -> hf", progress) as bar:
        writer = hf_io.HFWriter(partial, max_shard_bytes=max_shard_bytes, on_bytes=bar.update)
        for mapping, tensor in megatron_io.read_checkpoint(spec, ckpt_dir, dtype=dtype):
            for name, hf_tensor in zip(mapping.hf_names, hf_mapping.to_hf(mapping, tensor, spec)):
                writer.add(name, hf_tensor)
        writer.close()
    if config_dir is not None:
        hf_io.copy_aux_files(config_dir, partial)
    else:
        (partial / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    _finish_out(partial, out_dir)
    seconds = time.perf_counter() - start
    report = None
    if thresholds is not None:
        report = check_parity(out_dir, ckpt_dir, spec, thresholds)
    return ConversionResult(out_dir, total, seconds, report)


def check_parity(hf_dir: Path, ckpt_dir: Path, spec: hf_mapping.MappingSpec, thresholds: parity.ParityThresholds):
    """Load both sides in float32 and compare; raises ParityError (carrying the report) on failure."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    megatron_model = megatron_io.build_model(spec, dtype=torch.float32)
    megatron_io.load_checkpoint(megatron_model, ckpt_dir)
    prompts = parity.prompt_ids(hf_dir, spec.model.vocab_size)
    report = parity.compare(hf_model, megatron_model, prompts, thresholds)
    del hf_model, megatron_model
    gc.collect()
    if not report.passed:
        raise ParityError(report)
    return report


def verify_roundtrip(hf_dir: str | Path, megatron_dir: str | Path) -> list[str]:
    """Export `megatron_dir` back to HF in a temp folder and list every tensor that differs bitwise (name, dtype,
    values) from `hf_dir`; an empty list means the round trip is exact."""
    source = hf_io.HFReader(hf_dir)
    tied = bool(hf_io.read_config(hf_dir).get("tie_word_embeddings"))
    with tempfile.TemporaryDirectory() as tmp:
        back_dir = Path(tmp) / "hf"
        megatron_to_hf(megatron_dir, back_dir, thresholds=None, progress=False)
        back = hf_io.HFReader(back_dir)
        problems = []
        expected = {n for n in source.weight_map if not n.endswith(IGNORED_HF_SUFFIXES)}
        if tied:
            expected.discard("lm_head.weight")
        for name in sorted(expected | set(back.weight_map)):
            if name not in back or name not in source:
                problems.append(f"{name}: only in {'source' if name in source else 'round trip'}")
                continue
            a, b = source.get(name), back.get(name)
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                problems.append(f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)} differ")
        return problems
