"""Data loading, splits, prompts and answer scoring of every task."""

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tasks  # noqa: E402
from tasks import (  # noqa: E402
    DataError,
    Example,
    extract_choice,
    extract_code,
    extract_number,
    get_task,
    load_splits,
    match_aliases,
    normalize_answer,
    numbers_equal,
)

# ---------------------------------------------------------------------------
# Final number (gsm8k, basic_arithmetic, addsub, singleeq)
# ---------------------------------------------------------------------------

NUMBER_CASES = [
    ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The answer is 18.", "18"),
    ("The answer is $1,234.", "1234"),
    ("So she paid $1,234.50 in total.", "1234.5"),
    ("The temperature fell to -5 degrees.\nThe answer is -5", "-5"),
    ("Therefore the total is \\boxed{42}.", "42"),
    ("Final: $\\boxed{1,000}$", "1000"),
    ("The answer is: 7.0", "7"),
    ("Answer: 12", "12"),
    ("**Answer:** 30", "30"),
    ("The answer is **25** apples.", "25"),
    ("He had 5 apples and bought 3 more, so 5 + 3 = 8.", "8"),
    ("The answer is 8. He started with 5 apples and bought 3.", "8"),
    ("#### 72\nNatalia sold 48 clips in April.", "72"),
    ("33 + 1 = 34", "34"),
    ("Answer: 33 + 1 = 34", "34"),
    ("The answer is 5 + 91 = 96.\nCheck: 96 - 91 = 5", "96"),
    ("The answer is 18 = eighteen", "18"),
    ("28 - 64 = -36", "-36"),
    ("10-3=7", "7"),
    ("He read pages 10-12", "12"),
    ("It takes 0.5 hours. The answer is 0.5 hours", "0.5"),
    ("Scores were 1, 2 and 3", "3"),
    ("The answer is 1,080.", "1080"),
    ("The final answer is 100%.", "100"),
    ("Answer = 05", "5"),
    ("The answer is twelve.", None),
    ("I don't know how to solve this.", None),
    ("", None),
]


@pytest.mark.parametrize("completion, expected", NUMBER_CASES)
def test_extract_number(completion, expected):
    assert extract_number(completion) == expected


@pytest.mark.parametrize(
    "prediction, gold, equal",
    [
        ("5.0", "5", True),
        ("1,234", "1234", True),
        ("0.50", "0.5", True),
        ("-36", "-36", True),
        ("-5", "5", False),
        ("18", "17", False),
        (None, "3", False),
        ("abc", "1", False),
    ],
)
def test_numbers_equal(prediction, gold, equal):
    assert numbers_equal(prediction, gold) is equal


def test_gsm8k_score():
    example = Example("train-0", "q", "18", {})
    task = get_task("gsm8k")
    assert task.score(example, "9 * 2 = 18 dollars.\nThe answer is $18.") == {"correct": True, "prediction": "18"}
    assert task.score(example, "16 eggs, 3 eaten. The answer is 13.")["correct"] is False
    assert task.score(example, "I am not sure.") == {"correct": False, "prediction": None}


RESULT_CASES = [
    ("33 + 1 = 34", "34"),
    ("559 + 0 = 559\n\nThis is the identity property of 0.", "559"),
    ("5 + 91 = 96. Adding 5 to 91 gives 96.", "96"),
    ("12 - 20 = -8", "-8"),
    ("7 * 8 = 56, because 7 times 8 is 56.", "56"),
    ("1,000 + 234 = 1,234", "1234"),
    ("= 42", "42"),
    ("The answer is 17.\nNote that 3 + 4 = 7.", "17"),
    ("Answer: 9", "9"),
    ("**96**", "96"),
    ("96", "96"),
    ("The sum of 5 and 91 is 96.\nIn other words 2 numbers were added.", "96"),
    ("Calculate 5 + 91 = $96", "96"),
    ("3.5 + 1.5 = 5.0", "5"),
    ("I cannot compute that.", None),
    ("", None),
    ("\n\n  40 + 2 gives 42\nthen 43", "42"),
]


@pytest.mark.parametrize("completion, expected", RESULT_CASES)
def test_extract_result_number(completion, expected):
    assert tasks.extract_result_number(completion) == expected


def test_basic_arithmetic_score_restated_sum():
    example = Example("q1", "Calculate 33 + 1 =\nAnswer with a number.", "34", {})
    task = get_task("basic_arithmetic")
    assert task.score(example, "33 + 1 = 34")["correct"] is True
    assert task.score(example, "33 + 1 = 35")["correct"] is False


# ---------------------------------------------------------------------------
# Option letter (arc_easy, sciq)
# ---------------------------------------------------------------------------

CHOICE_CASES = [
    ("B", "ABCD", "B"),
    ("B.", "ABCD", "B"),
    ("(B)", "ABCD", "B"),
    ("The answer is B", "ABCD", "B"),
    ("Answer: C", "ABCD", "C"),
    ("**D**", "ABCD", "D"),
    ("The correct answer is **B**.", "ABCD", "B"),
    ("Plants make food by photosynthesis, which needs sunlight.\nC", "ABCD", "C"),
    ("A plant needs water and light to grow.", "ABCD", None),
    ("A. cellular telephone", "ABCD", "A"),
    ("A", "ABCD", "A"),
    ("The answer is A.", "ABCD", "A"),
    ("The answer is A plant.", "ABCD", None),
    ("The answer is A because the nervous system coordinates muscles.", "ABCD", "A"),
    ("D) airplane", "ABCD", "D"),
    ("b", "ABCD", "B"),
    ("Answer: (C) Do algae use sunlight to make food?", "ABCD", "C"),
    ("The correct option is C because algae make food.", "ABCD", "C"),
    ("Option A is wrong because it is too slow. The answer is D.", "ABCD", "D"),
    ("C is correct.", "ABCD", "C"),
    ("Answer: B\nExplanation: A plant needs light.", "ABCD", "B"),
    ("The answer is E.", "ABCD", None),
    ("E", "ABCDE", "E"),
    ("I think it is the nervous system.", "ABCD", None),
    ("Both options seem plausible.", "ABCD", None),
    ("", "ABCD", None),
]


@pytest.mark.parametrize("completion, letters, expected", CHOICE_CASES)
def test_extract_choice(completion, letters, expected):
    assert extract_choice(completion, letters) == expected


def test_arc_numeric_labels_shown_as_letters(tmp_path):
    record = {
        "id": "NYSEDREGENTS_2015_4_8",
        "question": "Which is a mixture?",
        "choices": {"text": ["salt", "sugar", "salad", "water"], "label": ["1", "2", "3", "4"]},
        "answerKey": "3",
    }
    _write_jsonl(tmp_path / "arc_easy" / "validation.jsonl", [record] * 10)
    example = load_splits("arc_easy", data_dir=tmp_path).train[0]
    assert example.answer == "C"
    assert "\nC. salad\n" in example.question
    assert get_task("arc_easy").score(example, "The answer is C.") == {"correct": True, "prediction": "C"}
    assert get_task("arc_easy").score(example, "3")["correct"] is False


# ---------------------------------------------------------------------------
# TriviaQA normalization, exact match and containment
# ---------------------------------------------------------------------------

NORMALIZE_CASES = [
    ("The Beatles", "beatles"),
    ("Sunset Blvd.", "sunset blvd"),
    ("Campbell-Bannerman", "campbell bannerman"),
    ("  An   Apple a Day ", "apple day"),
    ("U.S.A.", "u s"),  # the trailing "a" is dropped as an article, as in TriviaQA's own rule
    ("Rock_and_roll", "rock and roll"),
    ("‘Hello’", "hello"),
    ("Théâtre", "théâtre"),
    ("Anthem", "anthem"),
    ("Theatre", "theatre"),
    ("O'Brien", "o brien"),
    ("THE END", "end"),
    ("", ""),
    ("The", ""),
    ("1,000", "1 000"),
]


@pytest.mark.parametrize("text, expected", NORMALIZE_CASES)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


SUNSET = ["Sunset Boulevard", "Sunset Blvd", "West Sunset Boulevard"]
MATCH_CASES = [
    ("Sunset Boulevard", SUNSET, True, True),
    ("The answer is Sunset Boulevard.", SUNSET, False, True),
    ("sunset blvd.", SUNSET, True, True),
    ("Sunset", SUNSET, False, False),
    ("Sunsets Boulevard", SUNSET, False, False),
    ("Paris", ["Paris"], True, True),
    ("Parisian cafe", ["Paris"], False, False),
    ("Comparison", ["Paris"], False, False),
    ("Henry Campbell-Bannerman was prime minister", ["Campbell-Bannerman"], False, True),
    ("", ["Paris"], False, False),
    ("The", ["The"], False, False),
    ("It happened in 1066.", ["1066"], False, True),
    ("10666", ["1066"], False, False),
    ("The Who", ["The Who", "Who"], True, True),
    ("London, England", ["London"], False, True),
    ("I don't know", ["Paris"], False, False),
    ("PARIS!!!", ["paris"], True, True),
    ("New York City", ["York"], False, True),
]


@pytest.mark.parametrize("prediction, aliases, exact, contains", MATCH_CASES)
def test_match_aliases(prediction, aliases, exact, contains):
    assert match_aliases(prediction, aliases) == (exact, contains)


def test_triviaqa_score_keys():
    example = Example("tc_33", "Which musical?", ["Sunset Boulevard", "Sunset Blvd"], {"normalized_aliases": []})
    score = get_task("triviaqa").score(example, "  It is Sunset Blvd.\n")
    assert score == {"em": False, "contains": True, "prediction": "It is Sunset Blvd."}


# ---------------------------------------------------------------------------
# Code extraction (mbpp)
# ---------------------------------------------------------------------------

FUNCTION = "def f(x):\n    return x"
CODE_CASES = [
    (f"```python\n{FUNCTION}\n```", FUNCTION),
    (f"Here is the function:\n```python\n{FUNCTION}\n```\nIt returns x.", FUNCTION),
    ("```py\ndef f(): pass\n```", "def f(): pass"),
    ("```\ndef f(): pass\n```", "def f(): pass"),
    ("```Python\ndef f(): pass\n```", "def f(): pass"),
    ("```python3\ndef f(): pass\n```", "def f(): pass"),
    ("```python  \ndef f(): pass\n```", "def f(): pass"),
    (f"Usage:\n```python\nprint(f(1))\n```\nCode:\n```python\n{FUNCTION}\n```", FUNCTION),
    (f"```python\n{FUNCTION}", FUNCTION),
    (FUNCTION, FUNCTION),
    (f"Sure! Here it is:\n{FUNCTION}", FUNCTION),
    ("import math\ndef f(x): return math.sqrt(x)", "import math\ndef f(x): return math.sqrt(x)"),
    ("Use this:\nfrom collections import Counter\ndef f(s): return Counter(s)", "from collections import Counter\ndef f(s): return Counter(s)"),
    ("```python\r\ndef f(x):\r\n    return x\r\n```", FUNCTION),
    ("```python\n@staticmethod\ndef f(): pass\n```", "@staticmethod\ndef f(): pass"),
    ("```python\nclass Solution:\n    pass\n```", "class Solution:\n    pass"),
    ("```bash\npip install numpy\n```\n```python\ndef f(): pass\n```", "def f(): pass"),
    ("```bash\nls\n```", "ls"),
    ("I cannot solve this.", "I cannot solve this."),
    ("", ""),
]


@pytest.mark.parametrize("completion, expected", CODE_CASES)
def test_extract_code(completion, expected):
    assert extract_code(completion) == expected


def test_mbpp_score_runs_tests():
    tests = ["assert square(3) == 9", "assert square(-2) == 4"]
    answer = {"test_list": tests, "test_setup_code": "", "reference_code": "def square(x): return x * x"}
    example = Example("700", "Write a function to square a number.", answer, {"task_id": 700})
    task = get_task("mbpp")
    good = task.score(example, "```python\ndef square(x):\n    return x ** 2\n```")
    assert good == {"correct": True, "prediction": "def square(x):\n    return x ** 2", "status": "passed"}
    bad = task.score(example, "```python\ndef square(x):\n    return x * 2\n```")
    assert bad["correct"] is False
    assert bad["status"] == "failed"
    both = task.score_batch([example, example], ["def square(x): return x*x", "no code"])
    assert [s["correct"] for s in both] == [True, False]


# ---------------------------------------------------------------------------
# Splits on small synthetic files
# ---------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _arc_records(n):
    return [
        {
            "id": f"item_{i}",
            "question": f"Question {i}?",
            "choices": {"text": ["w", "x", "y", "z"], "label": list("ABCD")},
            "answerKey": "ABCD"[i % 4],
        }
        for i in range(n)
    ]


def _sciq_records(n):
    return [
        {"question": f"Q{i}?", "correct_answer": f"right{i}", "distractor1": "d1", "distractor2": "d2",
         "distractor3": "d3", "support": ""}
        for i in range(n)
    ]


def _arithmetic_records(n):
    return [
        {"id": f"q{i}", "question": f"Calculate {i} + 1 =",
         "choices": {"text": [str(i), str(i + 1), str(i + 2), str(i + 3)], "label": list("ABCD")},
         "answerKey": "B", "type_tag": "easy"}
        for i in range(n)
    ]


def _gsm8k_records(n):
    return [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1:,}"} for i in range(n)]


def _mbpp_records():
    return [
        {"task_id": i, "text": f"Task {i}", "code": "def f(): return 1", "test_setup_code": "",
         "test_list": ["assert f() == 1"], "challenge_test_list": []}
        for i in range(1, 975)
    ]


def _trivia_records(n):
    return [
        {"question": f"Fact {i}?", "question_id": f"tc_{i}", "question_source": "",
         "answer": {"value": f"Answer {i}", "aliases": [f"Answer {i}", f"A{i}"],
                    "normalized_aliases": [f"answer {i}", f"a{i}"], "normalized_value": f"answer {i}"}}
        for i in range(n)
    ]


@pytest.fixture
def synthetic_dir(tmp_path):
    _write_jsonl(tmp_path / "arc_easy" / "validation.jsonl", _arc_records(100))
    _write_jsonl(tmp_path / "sciq" / "validation.jsonl", _sciq_records(100))
    _write_jsonl(tmp_path / "basic_arithmetic" / "validation.jsonl", _arithmetic_records(900))
    _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", _gsm8k_records(300))
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", _gsm8k_records(20))
    _write_jsonl(tmp_path / "mbpp" / "mbpp.jsonl", _mbpp_records())
    _write_jsonl(tmp_path / "triviaqa" / "validation.jsonl", _trivia_records(50))
    return tmp_path


SYNTHETIC_SIZES = {
    "arc_easy": (50, 20, 30),
    "sciq": (50, 20, 30),
    "basic_arithmetic": (200, 200, 500),
    "gsm8k": (100, 200, 20),
    "mbpp": (374, 90, 500),
    "triviaqa": (50, 0, 0),
}


def _ids(examples):
    return [e.id for e in examples]


@pytest.mark.parametrize("name", sorted(SYNTHETIC_SIZES))
def test_splits_sizes_and_disjoint(synthetic_dir, name):
    splits = load_splits(name, data_dir=synthetic_dir, seed=0)
    sizes = (len(splits.train), len(splits.validation), len(splits.test))
    assert sizes == SYNTHETIC_SIZES[name]
    train, validation, test = set(_ids(splits.train)), set(_ids(splits.validation)), set(_ids(splits.test))
    assert len(train) == len(splits.train)
    assert not train & validation
    assert not train & test
    assert not validation & test


@pytest.mark.parametrize("name", ["arc_easy", "sciq", "basic_arithmetic", "gsm8k", "triviaqa"])
def test_splits_deterministic_per_seed(synthetic_dir, name):
    first = load_splits(name, data_dir=synthetic_dir, seed=3)
    again = load_splits(name, data_dir=synthetic_dir, seed=3)
    other = load_splits(name, data_dir=synthetic_dir, seed=4)
    assert first.describe() == again.describe()
    assert _ids(first.train) == _ids(again.train)
    assert _ids(first.train) != _ids(other.train)
    assert first.describe()["id_sha256"]["train"] != other.describe()["id_sha256"]["train"]


def test_mbpp_split_by_task_id(synthetic_dir):
    splits = load_splits("mbpp", data_dir=synthetic_dir, seed=0)
    assert {e.meta["task_id"] for e in splits.test} == set(range(11, 511))
    assert {e.meta["task_id"] for e in splits.validation} == set(range(511, 601))
    assert {e.meta["task_id"] for e in splits.train} == set(range(601, 975))
    assert _ids(splits.test) == _ids(load_splits("mbpp", data_dir=synthetic_dir, seed=9).test)


def test_gsm8k_gold_without_commas(tmp_path):
    records = _gsm8k_records(3)
    records[1]["answer"] = "He saves 80,000 + 50,000 = 130,000.\n#### 1,080"
    _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", records)
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", records)
    example = next(e for e in load_splits("gsm8k", data_dir=tmp_path).test if e.id == "test-1")
    assert example.answer == "1080"
    assert example.question.endswith(get_task("gsm8k").prompt_format)
    assert get_task("gsm8k").score(example, "The answer is 1,080.")["correct"] is True


def test_sciq_option_shuffle_stable(synthetic_dir):
    first = {e.id: e for e in load_splits("sciq", data_dir=synthetic_dir, seed=0).train}
    again = {e.id: e for e in load_splits("sciq", data_dir=synthetic_dir, seed=0).train}
    other = load_splits("sciq", data_dir=synthetic_dir, seed=1)
    other = {e.id: e for e in other.train + other.validation + other.test}
    for example_id, example in first.items():
        assert example.meta["choices"] == again[example_id].meta["choices"]
        assert example.meta["choices"][" ABCD".index(example.answer) - 1].startswith("right")
        assert sorted(example.meta["choices"]) == sorted(other[example_id].meta["choices"])
    golds = [e.answer for e in first.values()]
    assert len(set(golds)) == 4, "the correct answer should land on every position"
    changed = sum(first[i].meta["choices"] != other[i].meta["choices"] for i in first)
    assert changed > len(first) // 2


def test_triviaqa_facts_are_first_of_train(synthetic_dir):
    splits = load_splits("triviaqa", data_dir=synthetic_dir, seed=5)
    facts = tasks.sample_facts(splits, 10)
    assert facts == splits.train[:10]
    assert facts[0].answer[0].startswith("Answer ")
    assert tasks.sample_facts(splits.train, 0) == []
    with pytest.raises(ValueError, match="requested 51 facts but the pool has 50"):
        tasks.sample_facts(splits, 51)


def test_describe_records_sources(synthetic_dir):
    description = load_splits("arc_easy", data_dir=synthetic_dir, seed=2).describe()
    assert description["seed"] == 2
    assert description["sizes"] == {"train": 50, "validation": 20, "test": 30}
    (source,) = description["sources"]
    assert source["origin"].endswith("arc_easy/validation.jsonl")
    assert source["records"] == 100
    assert re.fullmatch(r"[0-9a-f]{64}", source["sha256"])
    assert set(description["id_sha256"]) == {"train", "validation", "test"}
    assert json.loads(json.dumps(description)) == description


def test_save_to_disk_folder_loads(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "arc_easy" / "validation"
    datasets.Dataset.from_list(_arc_records(20)).save_to_disk(str(folder))
    splits = load_splits("arc_easy", data_dir=tmp_path)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 20
    assert splits.sources[0]["origin"] == str(folder)


def test_hub_used_only_when_asked(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return _sciq_records(10)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(FileNotFoundError):
        load_splits("sciq", data_dir=tmp_path)
    assert calls == []
    splits = load_splits("sciq", data_dir=tmp_path, hub=True)
    assert calls == [("allenai/sciq", None, "validation")]
    assert splits.sources[0]["origin"].startswith("hub:allenai/sciq")


def test_default_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(tasks.DATA_DIR_ENV, str(tmp_path))
    assert tasks.default_data_dir() == tmp_path


# ---------------------------------------------------------------------------
# Errors on bad input
# ---------------------------------------------------------------------------


def test_unknown_task_lists_known():
    with pytest.raises(ValueError) as error:
        get_task("gsm9k")
    message = str(error.value)
    assert "'gsm9k'" in message
    for name in ("gsm8k", "arc_easy", "sciq", "basic_arithmetic", "mbpp", "triviaqa"):
        assert name in message


def test_missing_field_names_file_record_field(tmp_path):
    records = _arc_records(5)
    del records[3]["answerKey"]
    path = _write_jsonl(tmp_path / "arc_easy" / "validation.jsonl", records)
    with pytest.raises(DataError) as error:
        load_splits("arc_easy", data_dir=tmp_path)
    message = str(error.value)
    assert str(path) in message
    assert "line 4" in message
    assert "item_3" in message
    assert "'answerKey'" in message


def test_missing_field_without_id_names_line(tmp_path):
    records = _gsm8k_records(5)
    del records[1]["question"]
    path = _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", records)
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", _gsm8k_records(2))
    with pytest.raises(DataError, match=re.escape(f"{path}, line 2: missing required field 'question'")):
        load_splits("gsm8k", data_dir=tmp_path)


def test_gsm8k_answer_without_final_number(tmp_path):
    records = _gsm8k_records(3)
    records[2]["answer"] = "She makes 18 dollars."
    _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", records)
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", _gsm8k_records(2))
    with pytest.raises(DataError, match=r"line 3: field 'answer' does not end with '#### N'"):
        load_splits("gsm8k", data_dir=tmp_path)


def test_triviaqa_empty_answer_rejected(tmp_path):
    records = _trivia_records(4)
    records[2]["answer"]["value"] = ""
    records[2]["answer"]["aliases"] = []
    path = _write_jsonl(tmp_path / "triviaqa" / "validation.jsonl", records)
    with pytest.raises(DataError) as error:
        load_splits("triviaqa", data_dir=tmp_path)
    message = str(error.value)
    assert str(path) in message
    assert "line 3" in message
    assert "tc_2" in message
    assert "'answer.value'" in message
    assert "'answer.aliases'" in message


def test_arc_answer_key_not_a_label(tmp_path):
    records = _arc_records(3)
    records[0]["answerKey"] = "E"
    _write_jsonl(tmp_path / "arc_easy" / "validation.jsonl", records)
    with pytest.raises(DataError, match=r"line 1 \(id item_0\): field 'answerKey' 'E' is not one of"):
        load_splits("arc_easy", data_dir=tmp_path)


def test_empty_file_named(tmp_path):
    path = tmp_path / "sciq" / "validation.jsonl"
    path.parent.mkdir()
    path.write_text("\n")
    with pytest.raises(DataError, match=re.escape(f"{path} contains no records")):
        load_splits("sciq", data_dir=tmp_path)


def test_invalid_json_line_named(tmp_path):
    path = _write_jsonl(tmp_path / "sciq" / "validation.jsonl", _sciq_records(3))
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=re.escape(f"{path}, line 4: invalid JSON")):
        load_splits("sciq", data_dir=tmp_path)


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_splits("triviaqa", data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "triviaqa" / "validation.jsonl") in message
    assert tasks.DATA_DIR_ENV in message
    assert "hub=True" in message


def test_no_data_folder_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(tasks, "default_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match=f"{tasks.DATA_DIR_ENV} is unset"):
        load_splits("gsm8k")


# ---------------------------------------------------------------------------
# Prompt rendering
# ---------------------------------------------------------------------------


def test_build_prompt_uses_chat_template():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    model = tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    example = Example("x", "What is 2 + 2?\n\nAnswer with a number.", "4", {})
    prompt = tasks.build_prompt(tokenizer, example)
    assert prompt == "<|user|>What is 2 + 2?\n\nAnswer with a number.<|end|><|assistant|>"


# ---------------------------------------------------------------------------
# Real data, checked against the data folder's SOURCES.md
# ---------------------------------------------------------------------------

REAL_SIZES = {
    "gsm8k": (7273, 200, 1319),
    "arc_easy": (285, 114, 171),
    "sciq": (500, 200, 300),
    "basic_arithmetic": (2300, 200, 500),
    "mbpp": (374, 90, 500),
    "triviaqa": (7993, 0, 0),
    "addsub": (198, 79, 118),
    "singleeq": (254, 102, 152),
}


@pytest.fixture(scope="module")
def real_data_dir():
    data_dir = tasks.default_data_dir()
    if data_dir is None or not (data_dir / "SOURCES.md").is_file():
        pytest.skip(f"no real data folder with SOURCES.md; set {tasks.DATA_DIR_ENV} to run these tests")
    return data_dir


@pytest.fixture(scope="module")
def published(real_data_dir):
    """file -> (records, sha256) from the table in SOURCES.md."""
    rows = re.findall(r"^\|\s*(\S+\.jsonl?)\s*\|.*\|\s*(\d+)\s*\|\s*([0-9a-f]{64})\s*\|$",
                      (real_data_dir / "SOURCES.md").read_text(), re.MULTILINE)
    assert rows, "SOURCES.md has no table of files"
    return {file: (int(records), sha256) for file, records, sha256 in rows}


@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_real_data_matches_sources(real_data_dir, published, name):
    splits = load_splits(name, data_dir=real_data_dir, seed=0)
    for source in splits.sources:
        file = "/".join(Path(source["origin"]).parts[-2:])
        assert file in published, f"{file} is not listed in SOURCES.md"
        assert (source["records"], source["sha256"]) == published[file]
    assert (len(splits.train), len(splits.validation), len(splits.test)) == REAL_SIZES[name]


def test_real_arc_numeric_labels(real_data_dir):
    splits = load_splits("arc_easy", data_dir=real_data_dir)
    examples = splits.train + splits.validation + splits.test
    numeric = [e for e in examples if e.meta["source_labels"][0] == "1"]
    assert len(numeric) == 21
    assert all(e.answer in "ABCD" for e in numeric)
    assert {len(e.meta["choices"]) for e in examples} == {3, 4, 5}


def test_real_triviaqa_normalization_matches_dataset(real_data_dir):
    """The dataset's own normalized_aliases were made with TriviaQA's rule; ours must agree."""
    rows = [json.loads(line) for line in (real_data_dir / "triviaqa" / "validation.jsonl").open()]
    for row in rows:
        ours = {normalize_answer(alias) for alias in row["answer"]["aliases"]} - {""}
        assert ours == set(row["answer"]["normalized_aliases"]), row["question_id"]
        assert normalize_answer(row["answer"]["value"]) == row["answer"]["normalized_value"]


def test_real_gold_answers_score_correct(real_data_dir):
    """Each task's own gold answer, written the way a model would, scores as correct."""
    for name, render in [
        ("gsm8k", lambda e: e.meta["solution"]),
        ("basic_arithmetic", lambda e: f"The result is {e.answer}."),
        ("arc_easy", lambda e: f"The answer is {e.answer}."),
        ("sciq", lambda e: f"{e.answer}. {e.meta['choices'][' ABCDE'.index(e.answer) - 1]}"),
    ]:
        examples = load_splits(name, data_dir=real_data_dir).test
        task = get_task(name)
        assert all(task.score(e, render(e))["correct"] for e in examples), name
    facts = load_splits("triviaqa", data_dir=real_data_dir).train[:500]
    assert all(get_task("triviaqa").score(e, e.answer[0])["em"] for e in facts)


def test_real_mbpp_reference_solutions_pass(real_data_dir):
    test_split = load_splits("mbpp", data_dir=real_data_dir).test[:12]
    completions = [f"```python\n{e.answer['reference_code']}\n```" for e in test_split]
    scores = get_task("mbpp").score_batch(test_split, completions)
    assert [s["status"] for s in scores] == ["passed"] * len(test_split)
