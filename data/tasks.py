"""Tasks as data: a YAML file under `configs/task/` defines a task (docs/method.md §1).

A task names its values, topology, numbers, templates and answer rule; this
module turns it into prompts and, given a tokenizer, into a concept schema
(the token-id variants of every concept value, docs/method.md §0). No task needs code.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TOPOLOGIES = ("cyclic", "sequential")
# shift: "{number} steps after {entity}", answer values[entity + number];
# next: a list of {number} consecutive values ending at {entity} (the field {run}), answer the value after it.
ANSWER_RULES = ("shift", "next")
CONCEPT_SETS = ("values", "answers")
TEMPLATE_FIELDS = {"shift": ({"entity", "number"}, {"entity", "number"}), "next": ({"run"}, {"run", "entity", "number"})}
VARIANT_FIELDS = {"value", "lower"}


def _fields(names: set[str]) -> str:
    return " and ".join(f"{{{n}}}" for n in sorted(names))


class TaskError(ValueError):
    """A task definition or task name that cannot be used, with the fix in the message."""


@dataclass(frozen=True)
class Prompt:
    text: str
    template_id: int  # index over (context, template) framings, contexts outermost
    entity: str
    number: int
    answer: str  # the answer value
    label: int  # index of `answer` in Task.concepts


@dataclass(frozen=True)
class Task:
    name: str
    topology: str
    answer_rule: str
    values: tuple[str, ...]
    numbers: tuple[int, ...]
    templates: tuple[str, ...]
    number_words: dict[int, str] | None = None
    concept_set: str = "values"
    variants: tuple[str, ...] = ("{value}", " {value}", "{lower}", " {lower}")
    contexts: tuple[str, ...] = ("",)  # prefixes; every template is asked after each of them
    run_separator: str = ", "  # joins the values of {run}

    def __post_init__(self) -> None:
        where = f"task '{self.name}'"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", self.name):
            raise TaskError(f"{where}: a task name becomes a folder and an HDF5 group, so it takes letters, digits, "
                            f"'_' and '-' only (no '/', no leading '.'); rename it, e.g. name: my_task.")  # fmt: skip
        if self.topology not in TOPOLOGIES:
            raise TaskError(f"{where}: topology '{self.topology}' is unknown; use one of {TOPOLOGIES}.")
        if self.answer_rule not in ANSWER_RULES:
            raise TaskError(f"{where}: answer_rule '{self.answer_rule}' is unknown; use one of {ANSWER_RULES}.")
        if self.concept_set not in CONCEPT_SETS:
            raise TaskError(f"{where}: concepts '{self.concept_set}' is unknown; use one of {CONCEPT_SETS}.")
        if len(self.values) < 2 or len(set(self.values)) != len(self.values):
            raise TaskError(f"{where}: values must be at least two distinct strings, got {list(self.values)}.")
        if not self.numbers:
            raise TaskError(f"{where}: the numbers list is empty; give at least one step size.")
        if not self.templates:
            raise TaskError(
                f"{where}: the template list is empty; add at least one template with "
                f"{_fields(TEMPLATE_FIELDS[self.answer_rule][0])}."
            )
        needed, allowed = TEMPLATE_FIELDS[self.answer_rule]
        for i, template in enumerate(self.templates):
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            if not needed <= fields <= allowed:
                raise TaskError(
                    f"{where}: template {i} {template!r} has fields {sorted(fields)}; with answer_rule "
                    f"'{self.answer_rule}' each template needs {_fields(needed)} and may use {_fields(allowed)}."
                )
        if not self.contexts or not all(isinstance(c, str) for c in self.contexts):
            raise TaskError(f'{where}: contexts must be a non-empty list of strings ("" for none), got {self.contexts!r}.')
        if self.answer_rule == "next" and min(self.numbers) < 1:
            raise TaskError(
                f"{where}: with answer_rule 'next' the numbers are run lengths and must be ≥ 1, got {list(self.numbers)}."
            )
        for pattern in self.variants:
            fields = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
            if not fields or not fields <= VARIANT_FIELDS:
                raise TaskError(f"{where}: variant pattern {pattern!r} must use only {{value}} or {{lower}}.")
        missing = [n for n in self.numbers if self.number_words is not None and n not in self.number_words]
        if missing:
            raise TaskError(f"{where}: number_words has no word for {missing}; add them or drop number_words.")
        if not self.prompts():
            raise TaskError(f"{where}: no (entity, number) pair has an answer; check values, numbers and topology.")

    def answer_index(self, entity_index: int, number: int) -> int | None:
        """Index into `values` of the answer, or None when a sequential task runs off either end."""
        if self.answer_rule == "next":
            if self.topology == "sequential" and entity_index - number + 1 < 0:
                return None  # the run would start before the first value
            number = 1
        j = entity_index + number
        if self.topology == "cyclic":
            return j % len(self.values)
        return j if j < len(self.values) else None

    def run_of(self, entity_index: int, number: int) -> str:
        """The `number` consecutive values ending at `entity_index` (wrapping round on cyclic tasks)."""
        K = len(self.values)
        return self.run_separator.join(self.values[(entity_index - number + 1 + k) % K] for k in range(number))

    def neighbourhood(self, j: int, width: float) -> dict[int, float]:
        """A discretised Gaussian over value indices around `j`, summing to 1, that follows the topology.

        Cyclic tasks wrap around; sequential ones drop indices off either end. Weights
        below 1e-4 of the peak are left out. `width` is the std in value steps.
        """
        K, reach = len(self.values), max(0, math.ceil(width * math.sqrt(2 * math.log(1e4))))
        weights: dict[int, float] = {}
        for step in range(-reach, reach + 1):
            k = (j + step) % K if self.topology == "cyclic" else j + step
            if 0 <= k < K and width > 0:
                weights[k] = weights.get(k, 0.0) + math.exp(-0.5 * (step / width) ** 2)
        weights = weights or {j: 1.0}
        total = sum(weights.values())
        return {k: w / total for k, w in weights.items()}

    @property
    def concepts(self) -> tuple[str, ...]:
        """The K concept values, in value order."""
        if self.concept_set == "values":
            return self.values
        answered = {self.answer_index(i, n) for i in range(len(self.values)) for n in self.numbers}
        return tuple(v for j, v in enumerate(self.values) if j in answered)

    def render_number(self, number: int) -> str:
        return self.number_words[number] if self.number_words else str(number)

    def prompts(self) -> list[Prompt]:
        """Every (template, entity, number) prompt with an answer, in a fixed order."""
        label_of = {v: k for k, v in enumerate(self.concepts)}
        out = []
        framings = [context + template for context in self.contexts for template in self.templates]
        for t, template in enumerate(framings):
            for i, entity in enumerate(self.values):
                for n in self.numbers:
                    j = self.answer_index(i, n)
                    if j is None:
                        continue
                    fields = {"entity": entity, "number": self.render_number(n)}
                    if self.answer_rule == "next":
                        fields["run"] = self.run_of(i, n)
                    answer = self.values[j]
                    out.append(Prompt(template.format(**fields), t, entity, n, answer, label_of[answer]))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "topology": self.topology,
            "answer_rule": self.answer_rule,
            "values": list(self.values),
            "numbers": list(self.numbers),
            "number_words": self.number_words,
            "concepts": self.concept_set,
            "variants": list(self.variants),
            "templates": list(self.templates),
            # the keys added with answer_rule 'next' only when set, so older tasks keep their fingerprints
            **({"contexts": list(self.contexts)} if self.contexts != ("",) else {}),
            **({"run_separator": self.run_separator} if self.run_separator != ", " else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        known = {
            "name",
            "topology",
            "answer_rule",
            "values",
            "numbers",
            "number_words",
            "concepts",
            "variants",
            "templates",
            "contexts",
            "run_separator",
        }
        name = d.get("name", "<unnamed>")
        unknown = sorted(set(d) - known)
        if unknown:
            raise TaskError(f"task '{name}': unknown keys {unknown}; the known keys are {sorted(known)}.")
        missing = sorted({"name", "topology", "answer_rule", "values", "numbers", "templates"} - set(d))
        if missing:
            raise TaskError(f"task '{name}': missing keys {missing}.")
        words = d.get("number_words")
        kwargs = {}
        if "variants" in d:
            kwargs["variants"] = tuple(d["variants"])
        if "concepts" in d:
            kwargs["concept_set"] = d["concepts"]
        if "contexts" in d:
            kwargs["contexts"] = tuple(d["contexts"] or ())
        if "run_separator" in d:
            kwargs["run_separator"] = str(d["run_separator"])
        return cls(
            name=str(d["name"]),
            topology=d["topology"],
            answer_rule=d["answer_rule"],
            values=tuple(str(v) for v in d["values"]),
            numbers=tuple(int(n) for n in d["numbers"]),
            templates=tuple(d["templates"] or ()),
            number_words={int(k): str(v) for k, v in words.items()} if words else None,
            **kwargs,
        )


def available_tasks(task_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(task_dir).glob("*.yaml"))


def load_task(name_or_path: str, task_dir: Path) -> Task:
    """Load a task by name (a YAML in `task_dir`) or by the path of a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(task_dir) / f"{name_or_path}.yaml"
    if not path.is_file():
        raise TaskError(
            f"unknown task '{name_or_path}': no file {path}. Known tasks: {available_tasks(task_dir)}; "
            f"or pass the path of a task YAML (see configs/task/weekdays.yaml for the format)."
        )
    with open(path) as f:
        d = yaml.safe_load(f)
    if not isinstance(d, dict):
        raise TaskError(f"task file {path} does not hold a mapping; see configs/task/weekdays.yaml for the format.")
    return Task.from_dict(d)


@dataclass(frozen=True)
class ConceptSchema:
    """Token ids of every concept value; bin K (0-based) is "other"."""

    task: str
    values: tuple[str, ...]
    variant_ids: tuple[tuple[int, ...], ...]  # per value, its single-token variants

    @property
    def K(self) -> int:
        return len(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "values": list(self.values), "variant_ids": [list(v) for v in self.variant_ids]}


def concept_schema(task: Task, tokenizer: Any, tokenizer_name: str) -> ConceptSchema:
    """Find the single-token variants of every concept value in `tokenizer` (docs/method.md §0).

    Raises:
        TaskError: a value has no single-token variant, or two values share a token.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    variant_ids, owner = [], {}
    for value in task.concepts:
        ids: list[int] = []
        for pattern in task.variants:
            tokens = tokenizer.encode(pattern.format(value=value, lower=value.lower()), add_special_tokens=False)
            if len(tokens) == 1 and tokens[0] != unk and tokens[0] not in ids:
                ids.append(tokens[0])
        if not ids:
            raise TaskError(
                f"task '{task.name}': value {value!r} has no single-token variant in tokenizer '{tokenizer_name}' "
                f"(tried {[p.format(value=value, lower=value.lower()) for p in task.variants]}). "
                f"Add a variant pattern that is one token, or pick a model whose vocabulary has it."
            )
        for i in ids:
            if i in owner:
                raise TaskError(
                    f"task '{task.name}': values {owner[i]!r} and {value!r} share token id {i} in tokenizer "
                    f"'{tokenizer_name}'; make the variant patterns case-sensitive (drop {{lower}})."
                )
            owner[i] = value
        variant_ids.append(tuple(ids))
    return ConceptSchema(task.name, task.concepts, tuple(variant_ids))
