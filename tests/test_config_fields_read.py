"""Every field of the config tree is read by the package outside config.py: a key that nothing reads changes
nothing, and fails here.

A read is an attribute access `<owner>.<field>` whose owner is known to be that field's config class: the
section reached by name (`cfg.rollout.tp`, `rollout.tp` after `rollout = cfg.rollout`), a parameter annotated
with the class (`def f(genrm: GenRMConfig)`, then `genrm.tp`), or the root `cfg`/`config`. The scan uses `ast`
over fapo_megatron/; tests that a key changes the built object live next to the code that reads it.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from collections import defaultdict
from pathlib import Path

from fapo_megatron import config

PACKAGE = Path(config.__file__).parent
ROOT_NAMES = ("cfg", "config")
"""Names the code gives the root Config."""


def config_classes() -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """(class name -> its field names, section attribute name -> the config classes it holds)."""
    fields: dict[str, list[str]] = {}
    sections: dict[str, set[str]] = defaultdict(set)

    def walk(cls):
        hints = typing.get_type_hints(cls)
        fields[cls.__name__] = [field.name for field in dataclasses.fields(cls)]
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[field.name]):
                sections[field.name].add(hints[field.name].__name__)
                walk(hints[field.name])

    walk(config.Config)
    return fields, sections


def _annotation_name(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def fields_read(sources: list[str]) -> dict[str, set[str]]:
    """config class name -> the fields of it that `sources` read."""
    fields, sections = config_classes()
    read: dict[str, set[str]] = defaultdict(set)
    for source in sources:
        tree = ast.parse(source)
        owner_of: dict[str, set[str]] = defaultdict(set)  # local name -> config classes it may hold
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                    if _annotation_name(arg.annotation) in fields:
                        owner_of[arg.arg].add(_annotation_name(arg.annotation))
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        owner_of[target.id] |= sections.get(node.value.attr, set())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            value, owners = node.value, set()
            if isinstance(value, ast.Attribute):
                owners |= sections.get(value.attr, set())
            elif isinstance(value, ast.Name):
                owners |= owner_of.get(value.id, set()) | sections.get(value.id, set())
                if value.id in ROOT_NAMES:
                    owners.add("Config")
            for owner in owners:
                if node.attr in fields[owner]:
                    read[owner].add(node.attr)
    return read


def test_every_config_field_is_read_outside_config_py():
    fields, _ = config_classes()
    sources = [path.read_text() for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "config.py"]
    read = fields_read(sources)
    unread = [f"{cls}.{name}" for cls, names in fields.items() for name in names if name not in read[cls]]
    assert not unread, f"config fields nothing outside config.py reads (remove them or make them work): {unread}"


def test_an_unread_field_is_found():
    """Reads count only through their own section: `cfg.data.seed` does not make trainer.seed read."""
    read = fields_read(
        [
            "def f(cfg, genrm: GenRMConfig):\n"
            "    rollout = cfg.rollout\n"
            "    return cfg.data.seed, rollout.tp, genrm.max_steps, cfg.trainer\n"
        ]
    )
    assert read["DataConfig"] == {"seed"} and read["RolloutConfig"] == {"tp"}
    assert read["GenRMConfig"] == {"max_steps"} and "seed" not in read["TrainerConfig"]
    assert read["Config"] == {"data", "rollout", "trainer"}
