"""Tasks as data: prompt generation, answer rules, concept schemas, bad task files."""

from __future__ import annotations

import math

import pytest
import yaml

from geosteer.data.tasks import Task, TaskError, concept_schema, load_task
from geosteer.models.task_lm import build_word_tokenizer
from tests.conftest import TASK_DIR

ALL = ["weekdays", "months", "letters", "ages"]


@pytest.mark.parametrize("name", ALL)
def test_every_task_yaml_loads_with_five_templates(name):
    task = load_task(name, TASK_DIR)
    assert task.name == name
    assert len(task.templates) >= 5
    prompts = task.prompts()
    assert {p.template_id for p in prompts} == set(range(len(task.templates)))
    for p in prompts:
        assert p.entity in p.text and task.render_number(p.number) in p.text
        assert task.concepts[p.label] == p.answer


def test_cyclic_answers_wrap_round():
    task = load_task("weekdays", TASK_DIR)
    by_key = {(p.entity, p.number): p.answer for p in task.prompts()}
    assert by_key[("Sunday", 1)] == "Monday"
    assert by_key[("Friday", 3)] == "Monday"
    assert by_key[("Monday", 7)] == "Monday"
    assert len(task.prompts()) == 7 * 7 * len(task.templates)


def test_sequential_tasks_drop_results_past_the_end():
    letters = load_task("letters", TASK_DIR)
    pairs = {(p.entity, p.number) for p in letters.prompts()}
    assert ("Y", 1) in pairs and ("Y", 2) not in pairs and ("Z", 1) not in pairs
    assert len(pairs) == 26 * 4 - (1 + 2 + 3 + 4)
    ages = load_task("ages", TASK_DIR)
    assert ages.concepts == tuple(str(i) for i in range(2, 101))  # the distinct answers
    assert max(int(p.answer) for p in ages.prompts()) == 100


NEXT = ["weekdays_next", "months_next", "letters_next"]


@pytest.mark.parametrize("name", NEXT)
def test_list_continuations_show_the_run_before_the_answer_with_20_prompts_per_class(name):
    task = load_task(name, TASK_DIR)
    K, cyclic = len(task.values), task.topology == "cyclic"
    counts = {}
    for p in task.prompts():
        i = task.values.index(p.entity)
        run = [task.values[(i - p.number + 1 + k) % K] for k in range(p.number)]
        assert p.text.endswith(", ".join(run) + ","), "the run ends the prompt, ending at the entity"
        assert cyclic or task.values.index(run[0]) <= i, "a sequential run never wraps"
        assert p.answer == task.values[(i + 1) % K] and task.concepts[p.label] == p.answer
        counts[p.answer] = counts.get(p.answer, 0) + 1
    assert set(counts) == set(task.concepts) and min(counts.values()) >= 20
    assert {p.template_id for p in task.prompts()} == set(range(len(task.contexts) * len(task.templates)))


def test_next_rule_refuses_templates_without_the_run():
    spec = yaml.safe_load((TASK_DIR / "weekdays_next.yaml").read_text())
    spec["templates"] = ["{number} days after {entity}:"]
    with pytest.raises(TaskError, match=r"'next' each template needs \{run\}"):
        Task.from_dict(spec)


def test_tasks_without_contexts_keep_their_definition_and_fingerprint():
    assert set(load_task("weekdays", TASK_DIR).to_dict()) == {
        "name",
        "topology",
        "answer_rule",
        "values",
        "numbers",
        "number_words",
        "concepts",
        "variants",
        "templates",
    }
    assert load_task("letters_next", TASK_DIR).to_dict()["contexts"][0] == ""


def test_a_new_task_needs_only_a_yaml(tmp_path):
    spec = {
        "name": "seasons",
        "topology": "cyclic",
        "answer_rule": "shift",
        "values": ["spring", "summer", "autumn", "winter"],
        "numbers": [1, 2, 3],
        "templates": [f"Template {i}: {{number}} seasons after {{entity}} comes" for i in range(5)],
    }
    path = tmp_path / "seasons.yaml"
    path.write_text(yaml.safe_dump(spec))
    task = load_task(str(path), TASK_DIR)
    assert len(task.prompts()) == 4 * 3 * 5
    assert {(p.entity, p.number, p.answer) for p in task.prompts()} >= {("winter", 2, "summer")}


def test_unknown_task_names_the_known_ones():
    with pytest.raises(TaskError, match="unknown task 'weekday'.*weekdays"):
        load_task("weekday", TASK_DIR)


def test_empty_template_list_is_refused(tmp_path):
    spec = yaml.safe_load((TASK_DIR / "weekdays.yaml").read_text()) | {"templates": []}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(TaskError, match="template list is empty"):
        load_task(str(path), TASK_DIR)


def test_template_without_placeholder_is_refused(tmp_path):
    spec = yaml.safe_load((TASK_DIR / "weekdays.yaml").read_text())
    spec["templates"] = ["What day follows {entity}?"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(TaskError, match=r"template 0 .*\{entity\} and \{number\}"):
        load_task(str(path), TASK_DIR)


def test_concept_schema_has_single_token_variants_and_rejects_unknown_values():
    weekdays = load_task("weekdays", TASK_DIR)
    tok = build_word_tokenizer(p.text + " " + p.answer for p in weekdays.prompts())
    schema = concept_schema(weekdays, tok, "word-tokenizer")
    assert schema.K == 7
    for value, ids in zip(schema.values, schema.variant_ids):
        assert ids and all(tok.decode([i]).strip() == value for i in ids)
    months = load_task("months", TASK_DIR)  # month names are not in a weekday vocabulary
    with pytest.raises(TaskError, match="value 'January' has no single-token variant in tokenizer 'word-tokenizer'"):
        concept_schema(months, tok, "word-tokenizer")


@pytest.mark.parametrize(
    "values, message",
    [
        (["Monday ", "Tuesday"], r"values \['Monday '\] are empty or start or end with whitespace"),
        (["Monday", "monday"], r"'Monday' and 'monday' are the same word in lower case.*drop \{lower\}"),
    ],
)
def test_values_that_tokenise_alike_are_refused_when_the_task_loads(tmp_path, values, message):
    """Refused with the task, before any stage (stage=lm would otherwise train first and fail after)."""
    spec = yaml.safe_load((TASK_DIR / "weekdays.yaml").read_text()) | {"values": values, "number_words": None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(TaskError, match=message):
        load_task(str(path), TASK_DIR)
    spec["variants"] = ["{value}", " {value}"]  # without {lower}, case tells the two apart
    path.write_text(yaml.safe_dump(spec))
    if values[0].strip() == values[0]:
        assert load_task(str(path), TASK_DIR).values == tuple(values)


def test_neighbourhood_is_a_topology_aware_discrete_gaussian():
    weekdays, letters = load_task("weekdays", TASK_DIR), load_task("letters", TASK_DIR)
    ring = weekdays.neighbourhood(0, width=1.0)
    assert sum(ring.values()) == pytest.approx(1.0) and max(ring, key=ring.get) == 0
    assert ring[1] == pytest.approx(ring[6]), "cyclic: Sunday is Monday's neighbour as much as Tuesday"
    assert ring[1] / ring[0] == pytest.approx(math.exp(-0.5)) and ring[1] > ring[2] > ring[3]
    edge = letters.neighbourhood(0, width=1.0)
    assert min(edge) == 0 and edge[1] / edge[0] == pytest.approx(math.exp(-0.5)), "sequential: nothing before A"
    assert sum(edge.values()) == pytest.approx(1.0)
    assert letters.neighbourhood(5, width=0.0) == {5: 1.0}
