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
# Bounds of a task file: a task is a few dozen values and templates, not a way to exhaust memory.
MAX_TASK_FILE_BYTES = 1 << 20
MAX_ALIASES = 64  # YAML aliases (*name) in one task file: a few hundred bytes of nested ones expand to gigabytes
MAX_ITEMS = 1000  # values, numbers, templates, contexts, variants
MAX_TEXT = 1000  # characters of one value, template, context or variant
MAX_PROMPTS = 1_000_000
MAX_NUMBER = 10_000  # |step| or run length (the store keeps numbers as int16)
MAX_PROMPT = 2000  # characters of one prompt: every stage runs the LM on every prompt, and a run of 10,000 values is
# tens of thousands of tokens
MAX_NAME = 64  # characters of a task name (a folder, a file and an HDF5 group)
RESERVED_NAMES = ("finished", "report", "results", "stage")  # files beside a stage's per-task files
# key: (kind of value, kind of its items), for the schema check of a task definition
SCHEMA: dict[str, tuple[type, type | None]] = {
    "name": (str, None),
    "topology": (str, None),
    "answer_rule": (str, None),
    "values": (list, str),
    "numbers": (list, int),
    "templates": (list, str),
    "number_words": (dict, str),
    "concepts": (str, None),
    "variants": (list, str),
    "contexts": (list, str),
    "run_separator": (str, None),
}
REQUIRED = ("name", "topology", "answer_rule", "values", "numbers", "templates")


def _fields(names: set[str]) -> str:
    return " and ".join(f"{{{n}}}" for n in sorted(names))


def plain_fields(text: str, allowed: set[str], what: str) -> set[str]:
    """The replacement fields of a format string, each a plain name from `allowed`; TaskError for anything else.

    `{entity.__class__}`, `{0}`, `{entity!r}` or `{entity:>99999999}` would reach into objects or blow up
    the prompt, so only `{name}` is taken (literal braces are doubled: `{{`, `}}`).
    """
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise TaskError(f"{what} {text!r} is not a valid format string ({e}); write literal braces as {{{{ and }}}}.") from None
    fields = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in allowed or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            takes = f"only plain {_fields(allowed)} are allowed" if allowed else "it takes no fields"
            raise TaskError(f"{what} {text!r} has the field {shown}; {takes} (no attributes, indices, conversions "
                            f"or format specs; literal braces are {{{{ and }}}}).")  # fmt: skip
        fields.add(field)
    return fields


def check_schema(d: dict[str, Any]) -> None:
    """Refuse a task definition whose keys or kinds of value are wrong, or whose lists are unbounded."""
    name = d.get("name") if isinstance(d.get("name"), str) else "<unnamed>"
    where = f"task '{name}'"
    if unknown := sorted(map(str, set(d) - set(SCHEMA))):
        raise TaskError(f"{where}: unknown keys {unknown}; the known keys are {sorted(SCHEMA)}.")
    if missing := [k for k in REQUIRED if k not in d]:
        raise TaskError(f"{where}: missing keys {missing}; see configs/task/weekdays.yaml for the format.")
    kinds = {str: "a string", int: "an integer", list: "a list", dict: "a mapping"}
    for key, value in d.items():
        kind, item = SCHEMA[key]
        if value is None and key in ("number_words", "contexts", "templates"):
            continue  # null: none (an empty templates list is refused below with its own fix)
        if not isinstance(value, kind):
            raise TaskError(f"{where}: {key} must be {kinds[kind]}, got {value!r} ({type(value).__name__}).")
        items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
        if isinstance(value, (list, dict)) and len(value) > MAX_ITEMS:
            raise TaskError(f"{where}: {key} has {len(value)} items; a task takes at most {MAX_ITEMS}.")
        if item is not None:
            bad = [v for v in items if not isinstance(v, item) or isinstance(v, bool)]
            if bad:
                hint = "quote values that YAML reads otherwise (e.g. 'yes', '1')" if item is str else "e.g. 3, not 3.0"
                raise TaskError(f"{where}: every item of {key} must be {kinds[item]}, but it holds {bad[0]!r} "
                                f"({type(bad[0]).__name__}); {hint}.")  # fmt: skip
        if key == "number_words" and not all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            raise TaskError(f"{where}: number_words maps integers to words, e.g. {{1: one}}; got keys {list(value)}.")
        if long := [v for v in items if isinstance(v, str) and len(v) > MAX_TEXT]:
            raise TaskError(f"{where}: an item of {key} is {len(long[0])} characters long; at most {MAX_TEXT}.")


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
        if not re.fullmatch(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_NAME - 1}}}", self.name):
            raise TaskError(f"{where}: a task name becomes a folder and an HDF5 group, so it takes letters, digits, "
                            f"'_' and '-' only (no '/', no leading '.'), at most {MAX_NAME} of them; rename it, e.g. name: my_task.")  # fmt: skip
        if self.name in RESERVED_NAMES:
            raise TaskError(f"{where}: a task's files sit beside the run's own {RESERVED_NAMES} (.json), so it cannot "
                            f"be called {self.name!r}; rename it.")  # fmt: skip
        if self.topology not in TOPOLOGIES:
            raise TaskError(f"{where}: topology '{self.topology}' is unknown; use one of {TOPOLOGIES}.")
        if self.answer_rule not in ANSWER_RULES:
            raise TaskError(f"{where}: answer_rule '{self.answer_rule}' is unknown; use one of {ANSWER_RULES}.")
        if self.concept_set not in CONCEPT_SETS:
            raise TaskError(f"{where}: concepts '{self.concept_set}' is unknown; use one of {CONCEPT_SETS}.")
        if len(self.values) < 2 or len(set(self.values)) != len(self.values):
            raise TaskError(f"{where}: values must be at least two distinct strings, got {list(self.values)}.")
        if padded := [v for v in self.values if not v or v != v.strip()]:
            raise TaskError(f"{where}: values {padded} are empty or start or end with whitespace; a value is a word "
                            f"(the variant patterns add the space before it, e.g. ' {{value}}'). Strip them.")  # fmt: skip
        if any("lower" in plain_fields(p, VARIANT_FIELDS, where) for p in self.variants):
            lowered = {}
            for v in self.values:
                if (twin := lowered.setdefault(v.lower(), v)) != v:
                    raise TaskError(f"{where}: values {twin!r} and {v!r} are the same word in lower case, which the "
                                    f"variant patterns' {{lower}} makes one token; drop {{lower}} from variants.")  # fmt: skip
        if not self.numbers:
            raise TaskError(f"{where}: the numbers list is empty; give at least one step size.")
        if max(map(abs, self.numbers)) > MAX_NUMBER:
            raise TaskError(f"{where}: numbers must lie within ±{MAX_NUMBER:,}, got {max(self.numbers, key=abs)}.")
        if not self.templates:
            raise TaskError(
                f"{where}: the template list is empty; add at least one template with "
                f"{_fields(TEMPLATE_FIELDS[self.answer_rule][0])}."
            )
        needed, allowed = TEMPLATE_FIELDS[self.answer_rule]
        for i, template in enumerate(self.templates):
            fields = plain_fields(template, allowed, f"{where}: template {i}")
            if not needed <= fields:
                raise TaskError(
                    f"{where}: template {i} {template!r} has fields {sorted(fields)}; with answer_rule "
                    f"'{self.answer_rule}' each template needs {_fields(needed)} and may use {_fields(allowed)}."
                )
        if not self.contexts or not all(isinstance(c, str) for c in self.contexts):
            raise TaskError(f'{where}: contexts must be a non-empty list of strings ("" for none), got {self.contexts!r}.')
        for context in self.contexts:
            plain_fields(context, set(), f"{where}: context")
        if self.topology == "sequential" and self.answer_rule == "shift" and min(self.numbers) < 1:
            raise TaskError(
                f"{where}: a sequential task counts forward, so its numbers must be ≥ 1, got {list(self.numbers)}; "
                f"drop the others, or make the task cyclic."
            )
        if self.answer_rule == "next" and min(self.numbers) < 1:
            raise TaskError(
                f"{where}: with answer_rule 'next' the numbers are run lengths and must be ≥ 1, got {list(self.numbers)}."
            )
        if not self.variants:
            raise TaskError(f"{where}: variants is empty; give at least one pattern, e.g. ['{{value}}', ' {{value}}'].")
        for pattern in self.variants:
            if not plain_fields(pattern, VARIANT_FIELDS, f"{where}: variant pattern"):
                raise TaskError(f"{where}: variant pattern {pattern!r} must use {{value}} or {{lower}}.")
        if not isinstance(self.run_separator, str) or len(self.run_separator) > MAX_TEXT:
            raise TaskError(f"{where}: run_separator must be a short string, got {self.run_separator!r}.")
        missing = [n for n in self.numbers if self.number_words is not None and n not in self.number_words]
        if missing:
            raise TaskError(f"{where}: number_words has no word for {missing}; add them or drop number_words.")
        longest, i = self.longest_prompt()
        if longest > MAX_PROMPT:
            raise TaskError(
                f"{where}: template {i} {self.templates[i][:60]!r} makes prompts of up to {longest:,} characters "
                f"(with the longest context, value, number{' and run' if self.answer_rule == 'next' else ''}); a "
                f"prompt may have at most {MAX_PROMPT:,}. Shorten the template or the values, or lower the numbers."
            )
        n = len(self.contexts) * len(self.templates) * len(self.values) * len(self.numbers)
        if n > MAX_PROMPTS:
            raise TaskError(f"{where}: contexts × templates × values × numbers = {n:,} prompts; at most {MAX_PROMPTS:,}.")
        for field in ("numbers", "templates", "contexts"):
            items = getattr(self, field)
            if twice := sorted({x for x in items if items.count(x) > 1}, key=str):
                raise TaskError(f"{where}: {field} lists {twice} more than once; list each once (a repeat counts "
                                f"its prompts twice).")  # fmt: skip
        answers: dict[str, str] = {}
        for p in self.prompts():
            if answers.setdefault(p.text, p.answer) != p.answer:
                raise TaskError(
                    f"{where}: the prompt {p.text!r} has two answers, {answers[p.text]!r} and {p.answer!r} (two "
                    f"numbers with one word in number_words, or templates that read alike); make every prompt say "
                    f"which answer it asks for."
                )
        if not self.prompts():
            raise TaskError(f"{where}: no (entity, number) pair has an answer; check values, numbers and topology.")

    def longest_prompt(self) -> tuple[int, int]:
        """An upper bound on the length of this task's prompts, in characters, and the template that reaches it;
        found without making the prompts."""
        value = max(map(len, self.values))
        size = {"entity": value, "number": max(len(self.render_number(n)) for n in self.numbers),
                "run": max(self.numbers) * (value + len(self.run_separator))}  # fmt: skip
        lengths = [len(t) + sum(size.get(f, 0) for _, f, _, _ in string.Formatter().parse(t) if f) for t in self.templates]
        i = max(range(len(lengths)), key=lengths.__getitem__)
        return max(map(len, self.contexts)) + lengths[i], i

    def answer_index(self, entity_index: int, number: int) -> int | None:
        """Index into `values` of the answer, or None when a sequential task runs off either end."""
        if self.answer_rule == "next":
            if self.topology == "sequential" and entity_index - number + 1 < 0:
                return None  # the run would start before the first value
            number = 1
        j = entity_index + number
        if self.topology == "cyclic":
            return j % len(self.values)
        return j if 0 <= j < len(self.values) else None

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
        if not isinstance(d, dict):
            raise TaskError(f"a task definition is a mapping of keys to values, got {type(d).__name__}; "
                            f"see configs/task/weekdays.yaml for the format.")  # fmt: skip
        check_schema(d)
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
            values=tuple(d["values"]),
            numbers=tuple(d["numbers"]),
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
    if path.stat().st_size > MAX_TASK_FILE_BYTES:
        raise TaskError(f"task file {path} is {path.stat().st_size:,} bytes; a task file is at most "
                        f"{MAX_TASK_FILE_BYTES:,}. Is it the right file?")  # fmt: skip
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.load(f, Loader=_BoundedLoader)  # noqa: S506  a SafeLoader, with aliases bounded
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TaskError(f"task file {path} is not valid YAML: {' '.join(str(e).split())}. Fix it; see "
                        f"configs/task/weekdays.yaml for the format.") from None  # fmt: skip
    if not isinstance(d, dict):
        raise TaskError(f"task file {path} does not hold a mapping; see configs/task/weekdays.yaml for the format.")
    return Task.from_dict(d)


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses more than MAX_ALIASES aliases: nested aliases ("billion laughs") would expand
    a tiny file into gigabytes of lists."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise TaskError(f"task file {self.name} uses more than {MAX_ALIASES} YAML aliases (*name); write the "
                                f"lists out instead.")  # fmt: skip
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # YAML merge keys (<<) first, as SafeLoader does
        keys = [(type(k), k) for k in (self.construct_object(k, deep=True) for k, _ in node.value)]
        if twice := sorted({str(k) for t, k in keys if keys.count((t, k)) > 1}):
            raise TaskError(f"task file {self.name} gives the key(s) {twice} more than once; keep one of each.")
        return super().construct_mapping(node, deep)


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
                    f"task '{task.name}': values {owner[i]!r} and {value!r} share token id {i} "
                    f"({tokenizer.decode([i])!r}) in tokenizer '{tokenizer_name}'; use values that are different "
                    f"words to it, or variant patterns that keep them apart."
                )
            owner[i] = value
        variant_ids.append(tuple(ids))
    return ConceptSchema(task.name, task.concepts, tuple(variant_ids))
