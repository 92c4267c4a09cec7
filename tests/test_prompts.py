"""The robot-instruction prompt set (schema, taxonomy, pairing, length matching) and user files."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from importlib import resources
from statistics import mean

import pytest

from rdt_interp.errors import ConfigError, RdtError
from rdt_interp.prompts import load_prompt_file, robot_instructions

CATEGORIES = {"violence_to_people", "violence_to_animals", "property_damage", "fire_electrical",
              "chemical", "child_safety", "negligence"}
STOPWORDS = {"the", "a", "an", "to", "in", "on", "into", "onto", "with", "of", "at", "from", "and",
             "it", "its", "by", "for", "up", "off", "out", "over", "under", "as", "you", "can"}


def _raw_rows() -> list[dict]:
    path = resources.files("rdt_interp.data").joinpath("robot", "robot_instructions.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _words(text: str) -> int:
    return len(text.split())


# -- the robot-instruction set --------------------------------------------------------------------
def test_schema_is_exactly_the_documented_fields() -> None:
    rows = _raw_rows()
    assert isinstance(rows, list) and rows
    for row in rows:
        assert set(row) == {"instruction", "label", "category", "pair_id"}, row
        assert all(isinstance(v, str) and v for v in row.values()), row


def test_labels_and_categories_are_known() -> None:
    ps = robot_instructions()
    for p in ps:
        assert p.label in {"harmful", "benign"}, p
        if p.label == "harmful":
            assert p.category in CATEGORIES, p
        else:
            assert p.category == "benign", p


def test_every_category_has_at_least_twenty_harmful_instructions() -> None:
    counts = Counter(p.category for p in robot_instructions().filter(label="harmful"))
    assert set(counts) == CATEGORIES
    assert min(counts.values()) >= 20, counts
    assert sum(counts.values()) >= 140


def test_pairs_hold_one_harmful_and_one_benign_twin_sharing_an_object() -> None:
    by_pair: dict[str, list] = defaultdict(list)
    for p in robot_instructions():
        assert p.pair_id, p
        by_pair[p.pair_id].append(p)
    for pid, members in by_pair.items():
        assert sorted(m.label for m in members) == ["benign", "harmful"], pid
        # the twin talks about the same things: at least one content word in common
        h, b = ({w.removesuffix("'s") for w in m.instruction.split()} - STOPWORDS for m in members)
        assert h & b, (pid, [m.instruction for m in members])
        prefix = {"violence_to_people": "vp", "violence_to_animals": "va", "property_damage": "pd",
                  "fire_electrical": "fe", "chemical": "ch", "child_safety": "cs",
                  "negligence": "ng"}
        harmful = next(m for m in members if m.label == "harmful")
        assert pid.startswith(prefix[harmful.category] + "-"), pid


def test_harmful_and_benign_are_length_matched() -> None:
    ps = robot_instructions()
    harmful = [_words(p.instruction) for p in ps.filter(label="harmful")]
    benign = [_words(p.instruction) for p in ps.filter(label="benign")]
    mh, mb = mean(harmful), mean(benign)
    print(f"mean words: harmful {mh:.2f} (n={len(harmful)}), benign {mb:.2f} (n={len(benign)})")
    assert abs(mh - mb) / max(mh, mb) < 0.15
    # and pair by pair, not only on average
    by_pair: dict[str, dict[str, int]] = defaultdict(dict)
    for p in ps:
        by_pair[str(p.pair_id)][p.label] = _words(p.instruction)
    worst = max(abs(d["harmful"] - d["benign"]) for d in by_pair.values())
    assert worst <= 3


def test_instructions_are_unique_lowercase_imperatives_without_final_punctuation() -> None:
    texts = robot_instructions().instructions
    normalized = [" ".join(t.split()) for t in texts]
    dupes = [t for t, n in Counter(normalized).items() if n > 1]
    assert not dupes
    for t in texts:
        assert t == t.strip() == " ".join(t.split()), repr(t)
        assert t == t.lower(), t
        assert t[-1].isalpha(), t
        # fits OpenVLA's prompt "In: What action should the robot take to {instruction}?\nOut:"
        assert not t.startswith(("to ", "please", "i ", "can ")), t


def test_robot_instructions_digest_is_stable() -> None:
    a, b = robot_instructions(), robot_instructions()
    assert a.digest == b.digest
    assert len(a) == len(_raw_rows())
    assert a.filter(label="harmful").digest != a.filter(label="benign").digest


# -- user files: JSON / JSONL / CSV with a column mapping ---------------------------------------------
def test_load_json_objects_strings_and_wrapped(tmp_path) -> None:
    objs = tmp_path / "objs.json"
    objs.write_text(json.dumps([
        {"instruction": "pick up the cup", "label": "benign", "category": "", "pair_id": "p1"},
        {"instruction": "stab the person", "label": "harmful", "category": "violence", "pair_id": None},
    ]))
    ps = load_prompt_file(objs)
    assert ps.name == "objs"
    assert [p.label for p in ps] == ["benign", "harmful"]
    assert [p.category for p in ps] == ["none", "violence"]  # empty -> default
    assert [p.pair_id for p in ps] == ["p1", None]

    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["a", "b"]))
    ps = load_prompt_file(strings, name="mine")
    assert ps.name == "mine" and ps.instructions == ["a", "b"]
    assert {p.label for p in ps} == {"unknown"}

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"prompts": [{"instruction": "x"}]}))
    assert load_prompt_file(wrapped).instructions == ["x"]


def test_load_jsonl_with_column_mapping(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "open the gripper", "kind": "benign"}\n\n'
                    '{"text": "push the pot onto the child", "kind": "harmful", "label": "ignored"}\n')
    ps = load_prompt_file(path, column="text", label_column="kind", category_column=None)
    assert ps.instructions == ["open the gripper", "push the pot onto the child"]
    assert [p.label for p in ps] == ["benign", "harmful"]
    assert {p.category for p in ps} == {"none"}


def test_load_csv_with_column_mapping(tmp_path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('prompt,y,group,pair\n"put the cup, then the bowl",benign,,7\n'
                    "stab the person,harmful,violence,7\n")
    ps = load_prompt_file(path, column="prompt", label_column="y", category_column="group",
                          pair_column="pair")
    assert ps.instructions == ["put the cup, then the bowl", "stab the person"]
    assert [p.label for p in ps] == ["benign", "harmful"]
    assert [p.category for p in ps] == ["none", "violence"]
    assert [p.pair_id for p in ps] == ["7", "7"]
    # without a mapping the text column is not found, and the error names the fix
    with pytest.raises(ConfigError, match=r"no column 'instruction'.*\n  fix: pass column="):
        load_prompt_file(path)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("p.txt", "a\nb\n", "unsupported prompt file type '.txt'"),
        ("p.json", "[{]", "not valid JSON"),
        ("p.jsonl", '{"instruction": "a"}\n{oops\n', "not valid JSON"),
        ("p.json", '{"instruction": "a"}', "must hold a list"),
        ("p.json", "[]", "holds no prompts"),
        ("p.json", "[3]", "row 0 has no column 'instruction'"),
        ("p.json", '[{"instruction": "a"}, {"text": "b"}]', r"row 1 has no column 'instruction' \(has \['text'\]\)"),
    ],
)
def test_load_prompt_file_errors(tmp_path, name: str, content: str, pattern: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_prompt_file(path)
    assert isinstance(info.value, RdtError)


def test_load_prompt_file_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompt_file(tmp_path / "nope.json")


# -- grouped by label, and required labels -------------------------------------------------------------
GROUPED = {
    "harmful": [{"instruction": "stab the person", "category": "violence", "pair_id": "k"},
                "push the pot onto the child"],
    "benign": [{"instruction": "cut the bread", "category": "kitchen", "pair_id": "k"}],
}


def test_load_json_grouped_by_label(tmp_path) -> None:
    path = tmp_path / "grouped.json"
    path.write_text(json.dumps(GROUPED))
    ps = load_prompt_file(path, labels=("harmful", "benign"))
    assert ps.instructions == ["stab the person", "push the pot onto the child", "cut the bread"]
    assert [p.label for p in ps] == ["harmful", "harmful", "benign"]
    assert [p.category for p in ps] == ["violence", "none", "kitchen"]
    assert [p.pair_id for p in ps] == ["k", None, "k"]
    # a row's own label must agree with its group
    path.write_text(json.dumps({"harmful": [{"instruction": "x", "label": "benign"}], "benign": ["y"]}))
    with pytest.raises(ConfigError, match="is in group 'harmful' but its 'label' is 'benign'"):
        load_prompt_file(path)


def test_grouped_file_feeds_the_vla_requests(tmp_path) -> None:
    from rdt_interp.studies.vla import load_requests

    path = tmp_path / "grouped.json"
    path.write_text(json.dumps(GROUPED))
    reqs = load_requests(16, path, images="noise", val_fraction=0.0)
    assert [(r.label, r.category) for r in reqs if r.pair_id == "k"] == [("harmful", "violence"),
                                                                          ("benign", "kitchen")]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_required_labels_in_jsonl_and_csv(tmp_path, fmt: str) -> None:
    path = tmp_path / f"p.{fmt}"
    if fmt == "jsonl":
        path.write_text('{"text": "stab the person", "y": "harmful", "c": "violence"}\n'
                        '{"text": "cut the bread", "y": "benign", "c": "kitchen"}\n')
    else:
        path.write_text("text,y,c\nstab the person,harmful,violence\ncut the bread,benign,kitchen\n")
    ps = load_prompt_file(path, column="text", label_column="y", category_column="c",
                          labels=("harmful", "benign"))
    assert [(p.label, p.category) for p in ps] == [("harmful", "violence"), ("benign", "kitchen")]
    # the label column misnamed: every prompt is unlabelled, and the error says which column
    with pytest.raises(ConfigError, match=r"2 prompts have no label .*label column 'label'"):
        load_prompt_file(path, column="text", labels=("harmful", "benign"))
    # a required label that never occurs
    with pytest.raises(ConfigError, match=r"missing \['refused'\]"):
        load_prompt_file(path, column="text", label_column="y", labels=("harmful", "benign", "refused"))
    with pytest.raises(ConfigError, match=r"unknown \['harmful'\]"):
        load_prompt_file(path, column="text", label_column="y", labels=("benign",))


def test_grouped_file_missing_a_label_group(tmp_path) -> None:
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"harmful": ["stab the person"]}))
    with pytest.raises(ConfigError, match=r"missing \['benign'\]"):
        load_prompt_file(path, labels=("harmful", "benign"))
    path.write_text(json.dumps({"harmful": ["a"], "meta": {"v": 1}}))
    with pytest.raises(ConfigError, match="grouped by label"):
        load_prompt_file(path)
