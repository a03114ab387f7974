"""Data sets, prompts and answer scoring shared by every stage.

Every stage imports this module, so each task has exactly one definition of a
correct answer. Sections:

1. Records and splits: reading local files (or the hub) into `Example`s and
   seeded train/validation/test splits.
2. Answer extraction: final number, option letter, TriviaQA normalization and
   code blocks.
3. Tasks: prompt format, splits and scoring per data set, registered in TASKS.
4. Sandbox: runs generated MBPP code in a separate, resource-limited process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import random
import re
import secrets
import signal
import string
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

DATA_DIR_ENV = "PALORA_DATA_DIR"
LETTERS = "ABCDEFGH"


# ---------------------------------------------------------------------------
# 1. Records and splits
# ---------------------------------------------------------------------------


class DataError(ValueError):
    """A data file that cannot be used: empty, invalid JSON or a record with a missing field."""


@dataclass(frozen=True)
class Example:
    id: str  # stable within the data set: its own id field, or "<file stem>-<row index>"
    question: str  # user message, already formatted for the task
    answer: Any  # str (number or letter), list[str] of aliases (triviaqa), dict of tests (mbpp)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    filename: str  # under <data dir>/<task directory>/
    hub_splits: tuple[str, ...]  # hub splits that hold the same records


@dataclass(frozen=True)
class RecordRef:
    stem: str  # file stem, e.g. "train"
    index: int  # position in the file, from 0
    where: str  # "<path>, line 12 (id tc_33)", for error messages


@dataclass
class Splits:
    task: str
    seed: int
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    sources: list[dict]  # one entry per file or hub split read: origin, records, sha256

    def describe(self) -> dict:
        """Return sizes, seed, sources and a sha256 of each split's id list, to store with results."""
        parts = {"train": self.train, "validation": self.validation, "test": self.test}
        return {
            "task": self.task,
            "seed": self.seed,
            "sizes": {name: len(part) for name, part in parts.items()},
            "id_sha256": {name: _sha256_text("\n".join(e.id for e in part)) for name, part in parts.items()},
            "sources": self.sources,
            "prompt_format": get_task(self.task).prompt_format,
        }


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_data_dir() -> Path | None:
    """Return $PALORA_DATA_DIR, else the `data` folder laid beside the checkout if it exists."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    beside_checkout = Path(__file__).resolve().parent.parent / "shared" / "data"
    return beside_checkout if beside_checkout.is_dir() else None


def _read_local(path: Path) -> list[tuple[str, dict]]:
    """Read JSON Lines, a JSON list or a `datasets.save_to_disk` folder into (location, record) pairs."""
    if path.is_dir():
        import datasets

        return [(f"row {i}", dict(row)) for i, row in enumerate(datasets.load_from_disk(str(path)))]
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON ({error}). Restore the file from its source.") from error
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}.")
        return [(f"record {i}", record) for i, record in enumerate(data)]
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: invalid JSON ({error.msg}).") from error
    return records


def _read_hub(task: Task, source: Source) -> list[tuple[str, dict]]:
    import datasets

    records = []
    for split in source.hub_splits:
        rows = datasets.load_dataset(task.hub[0], task.hub[1], split=split)
        records += [(f"{split} row {i}", dict(row)) for i, row in enumerate(rows)]
    return records


def _read_source(task: Task, source: Source, data_dir: Path | None, hub: bool) -> tuple[list, dict]:
    """Read one source file (or its save_to_disk folder, or the hub); return records and provenance."""
    hub_name = " ".join(part for part in task.hub if part)
    hub_hint = f"; online, --hub (load_splits(hub=True)) downloads {hub_name}" if hub_name else " (this task has no hub copy)"
    path = data_dir / task.directory / source.filename if data_dir else None
    folder = path.with_suffix("") if path else None
    if path and path.is_file():
        origin, records, sha256 = str(path), _read_local(path), _sha256_file(path)
    elif folder and folder.is_dir():
        origin, records, sha256 = str(folder), _read_local(folder), None
    elif hub and hub_name:
        origin = f"hub:{hub_name} split={'+'.join(source.hub_splits)}"
        records, sha256 = _read_hub(task, source), None
    else:
        looked_at = str(path) if path else f"no data folder ({DATA_DIR_ENV} is unset)"
        raise FileNotFoundError(
            f"{task.name} data file not found: {looked_at}. Pass --data-dir (data_dir= in Python) or set "
            f"{DATA_DIR_ENV} to the folder that contains {task.directory}/{source.filename}{hub_hint}."
        )
    if not records:
        raise DataError(f"{origin} contains no records. Restore the complete file{hub_hint}.")
    return records, {"origin": origin, "records": len(records), "sha256": sha256}


def require_fields(record: dict, fields: Sequence[str], where: str) -> None:
    """Raise DataError naming the record and the first field that is missing or null."""
    for name in fields:
        if record.get(name) is None:
            raise DataError(f"{where}: missing required field '{name}'. Fix the record or restore the file.")


def _shuffled(examples: list[Example], seed: int, salt: str) -> list[Example]:
    # A string seed is hashed with SHA-512 by random.Random, so the order does not depend on PYTHONHASHSEED.
    order = list(examples)
    random.Random(f"{salt}:{seed}").shuffle(order)
    return order


def _cut(examples: list[Example], n_validation: int, n_test: int) -> tuple[list, list, list]:
    """Split a shuffled list into (train, validation, test): test first, then validation, rest train."""
    test = examples[:n_test]
    validation = examples[n_test : n_test + n_validation]
    return examples[n_test + n_validation :], validation, test


def load_splits(name: str, data_dir: str | Path | None = None, seed: int = 0, hub: bool = False) -> Splits:
    """Load a task's data and split it deterministically for `seed`.

    Files are read from data_dir, else default_data_dir(). With hub=True a missing
    local file is downloaded by its hub name instead (never needed for tests).
    """
    task = get_task(name)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    tables, sources = {}, []
    for source in task.sources:
        records, provenance = _read_source(task, source, root, hub)
        stem = Path(source.filename).stem
        examples = []
        for index, (location, record) in enumerate(records):
            record_id = record.get(task.id_field) if task.id_field and isinstance(record, dict) else None
            where = f"{provenance['origin']}, {location}" + (f" (id {record_id})" if record_id is not None else "")
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
            require_fields(record, task.required, where)
            examples.append(task.make_example(record, RecordRef(stem, index, where), seed))
        tables[stem] = examples
        sources.append(provenance)
    train, validation, test = task.split(tables, seed)
    return Splits(task.name, seed, train, validation, test, sources)


def sample_facts(splits_or_examples: Splits | Sequence[Example], n: int) -> list[Example]:
    """Return the first n facts: train of a triviaqa Splits (already shuffled by its seed) or a list."""
    pool = splits_or_examples.train if isinstance(splits_or_examples, Splits) else list(splits_or_examples)
    if not 0 <= n <= len(pool):
        raise ValueError(f"requested {n} facts but the pool has {len(pool)}; choose n between 0 and {len(pool)}.")
    return pool[:n]


def build_prompt(tokenizer, example: Example) -> str:
    """Render the example's question as one user turn with the tokenizer's chat template."""
    messages = [{"role": "user", "content": example.question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------
# 2. Answer extraction
# ---------------------------------------------------------------------------

# A number: optional minus (not when the hyphen joins two words or numbers, as in "10-3"),
# thousands separated by commas, optional decimals. "18." gives 18 because decimals need a digit.
_NUMBER = r"(?:(?<![\w)])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
# Explicit answer markers: "#### 18", "\boxed{18}", "The answer is $18", "Answer: 18", "answer = 18".
_MARKED_NUMBER_RE = re.compile(
    r"(?:####|\\boxed\s*\{|\banswer(?:\s+is)?\s*[:=]?)\s*(?:\\?\$\s*)?(" + _NUMBER + ")", re.IGNORECASE
)


def _canonical_number(text: str) -> str | None:
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """Return the final number of a completion, commas removed ("1,234.50" -> "1234.5").

    An explicit marker wins: the last of "#### N", "\\boxed{N}", "answer is N" and
    "Answer: N". Without one, the last number in the text counts, so "33 + 1 = 34"
    gives 34.
    """
    plain = text.replace("*", "")  # markdown bold around a marker or the number
    marked = list(_MARKED_NUMBER_RE.finditer(plain))
    if marked:
        # "Answer: 33 + 1 = 34" restates the sum after the marker: the result follows the last "=".
        line = plain[marked[-1].start(1) :].split("\n", 1)[0]
        result = _NUMBER_RE.search(line.rsplit("=", 1)[1]) if "=" in line else None
        return _canonical_number(result.group(0) if result else marked[-1].group(1))
    numbers = _NUMBER_RE.findall(plain)
    return _canonical_number(numbers[-1]) if numbers else None


def extract_result_number(text: str) -> str | None:
    """Return the result of a one-line calculation: the number after the first "=".

    Small models restate the sum, give the result, then often keep talking
    ("559 + 0 = 559. Adding 0 changes nothing."), so the last number is the
    wrong one. An explicit answer marker still wins. Without "=", the last
    number of the first non-empty line counts.
    """
    plain = text.replace("*", "")
    if _MARKED_NUMBER_RE.search(plain):
        return extract_number(plain)
    first_equation = re.search(r"=\s*(?:\\?\$\s*)?(" + _NUMBER + ")", plain)
    if first_equation:
        return _canonical_number(first_equation.group(1))
    first_line = next((line for line in plain.splitlines() if line.strip()), "")
    numbers = _NUMBER_RE.findall(first_line)
    return _canonical_number(numbers[-1]) if numbers else None


def numbers_equal(prediction: str | None, gold: str) -> bool:
    """Compare two numbers exactly as decimals, so "5.0" equals "5"."""
    if prediction is None:
        return False
    try:
        return Decimal(prediction.replace(",", "")) == Decimal(gold.replace(",", ""))
    except InvalidOperation:
        return False


# "A" and "I" are also English words: accept them only when followed by punctuation, the
# end of the line or a clause word, so that "A plant needs light" is not read as option A.
_AFTER_WORD_LETTER_RE = re.compile(r"(?:\s*$|\s*[.):,;\]]|\s+(?:because|since|as|-|–|—|\())", re.MULTILINE)


def _letter_at(text: str, match: re.Match | None) -> str | None:
    if match is None:
        return None
    letter = match.group(1)
    if letter in "AI" and not _AFTER_WORD_LETTER_RE.match(text, match.end(1)):
        return None
    return letter


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """Return the option letter a completion chooses, or None.

    Rules, first match wins:
    1. the last "answer is B" or "Answer: (B)";
    2. a letter that opens the completion: "B", "B.", "(B)", "B) text";
    3. a lone letter on the last line;
    4. the last "option B" or "choice B".
    Only upper-case letters of `letters` count. The one exception is a completion
    that is a single lower-case letter.
    """
    plain = text.replace("*", "").strip()  # markdown bold: "**B**", "**Answer:** B"
    if len(plain) == 1 and plain.upper() in letters:
        return plain.upper()
    letter = f"([{letters}])(?![\\w'])"
    answer_re = re.compile(rf"(?i:\banswer(?:\s+is)?)\s*[:=]?\s*[(\[]?{letter}")
    opening_re = re.compile(rf"^[(\[]?{letter}")
    last_line_re = re.compile(rf"^\W*{letter}\W*$")
    option_re = re.compile(rf"(?i:\b(?:option|choice)(?:\s+is)?)\s*[:=]?\s*[(\[]?{letter}")

    for candidate in reversed(list(answer_re.finditer(plain))):
        if found := _letter_at(plain, candidate):
            return found
    if found := _letter_at(plain, opening_re.match(plain)):
        return found
    lines = [line.strip() for line in plain.splitlines() if line.strip()]
    if lines and (match := last_line_re.match(lines[-1])):
        return match.group(1)
    for candidate in reversed(list(option_re.finditer(plain))):
        if found := _letter_at(plain, candidate):
            return found
    return None


# TriviaQA's answer normalization: lowercase, "_" and punctuation (including typographic
# quotes) become spaces, the articles a/an/the are dropped, white space is collapsed.
_PUNCTUATION = set(string.punctuation) | set("‘’´`")
_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(text: str) -> str:
    lowered = text.replace("_", " ").lower()
    spaced = "".join(" " if ch in _PUNCTUATION else ch for ch in lowered)
    return " ".join(_ARTICLES_RE.sub(" ", spaced).split())


def match_aliases(prediction: str, aliases: Sequence[str]) -> tuple[bool, bool]:
    """Return (exact match, contains) of a prediction against aliases, both after normalize_answer.

    contains is true when an alias occurs in the prediction as whole tokens.
    """
    targets = {normalize_answer(alias) for alias in aliases} - {""}
    normalized = normalize_answer(prediction)
    padded = f" {normalized} "
    exact = normalized in targets
    contains = any(f" {target} " in padded for target in targets)
    return exact, contains


_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_START_RE = re.compile(r"^(?:def |class |import |from \S+ import |@)", re.MULTILINE)


def extract_code(text: str) -> str:
    """Return the Python code of a completion.

    The first fenced block that defines a function or class wins, else the first
    Python or untagged block. A block left open (generation cut off) runs to the
    end. Without a fence, the code starts at the first def, class or import line,
    and without one of those it is the whole text.
    """
    text = text.replace("\r\n", "\n")
    blocks = [(tag.lower(), body) for tag, body in _FENCE_RE.findall(text)]
    python_blocks = [body for tag, body in blocks if tag in ("", "python", "py", "python3")]
    for body in python_blocks:
        if re.search(r"^\s*(?:def|class)\s", body, re.MULTILINE):
            return body.strip("\n")
    if python_blocks or blocks:
        return (python_blocks or [blocks[0][1]])[0].strip("\n")
    start = _CODE_START_RE.search(text)
    return (text[start.start() :] if start else text).strip()


# ---------------------------------------------------------------------------
# 3. Tasks
# ---------------------------------------------------------------------------


class Task:
    name: str
    directory: str  # folder of the task's files under the data folder
    sources: tuple[Source, ...]
    hub: tuple[str, str | None]  # (hub data set name, config) used with hub=True
    required: tuple[str, ...]  # fields every record must have
    id_field: str | None = None  # record field shown in error messages
    max_new_tokens: int
    prompt_format: str  # the instruction added to each question, recorded with results

    def make_example(self, record: dict, ref: RecordRef, seed: int) -> Example:
        raise NotImplementedError

    def split(self, tables: dict[str, list[Example]], seed: int) -> tuple[list, list, list]:
        """Default: one file, shuffled by seed, 30% test, 20% validation, the rest train."""
        (examples,) = tables.values()
        shuffled = _shuffled(examples, seed, self.name)
        return _cut(shuffled, round(0.2 * len(shuffled)), round(0.3 * len(shuffled)))

    def score(self, example: Example, completion: str) -> dict:
        raise NotImplementedError

    def score_batch(self, examples: Sequence[Example], completions: Sequence[str]) -> list[dict]:
        return [self.score(example, completion) for example, completion in zip(examples, completions, strict=True)]


class NumberTask(Task):
    """Tasks whose gold answer is one number."""

    def score(self, example: Example, completion: str) -> dict:
        prediction = extract_number(completion)
        return {"correct": numbers_equal(prediction, example.answer), "prediction": prediction}


class GSM8K(NumberTask):
    name = directory = "gsm8k"
    sources = (Source("train.jsonl", ("train",)), Source("test.jsonl", ("test",)))
    hub = ("openai/gsm8k", "main")
    required = ("question", "answer")
    # The training set's worked solutions, without calculator annotations, measure
    # median 84 and at most 342 tokens of the SmolLM2-135M tokenizer, and 99.6% fit in 256.
    max_new_tokens = 256
    prompt_format = 'Solve step by step. End with "The answer is N." where N is the final number.'
    validation_size = 200
    _GOLD_RE = re.compile(r"####\s*(" + _NUMBER + r")\s*$")

    def make_example(self, record: dict, ref: RecordRef, seed: int) -> Example:
        gold = self._GOLD_RE.search(record["answer"].strip())
        if gold is None:
            raise DataError(f"{ref.where}: field 'answer' does not end with '#### N'. Restore the file.")
        question = f"{record['question']}\n\n{self.prompt_format}"
        meta = {"solution": record["answer"]}
        return Example(f"{ref.stem}-{ref.index}", question, _canonical_number(gold.group(1)), meta)

    def split(self, tables, seed):
        shuffled = _shuffled(tables["train"], seed, self.name)
        return shuffled[self.validation_size :], shuffled[: self.validation_size], list(tables["test"])


class WordProblem(NumberTask):
    """AddSub and SingleEq: short arithmetic word problems, gold in lSolutions[0]."""

    hub = ("", None)  # local files only, because no hub copy with a stable name is known
    required = ("iIndex", "sQuestion", "lSolutions")
    id_field = "iIndex"
    max_new_tokens = 256
    prompt_format = GSM8K.prompt_format

    def __init__(self, name: str, filename: str):
        self.name = self.directory = name
        self.sources = (Source(filename, ()),)

    def make_example(self, record: dict, ref: RecordRef, seed: int) -> Example:
        solutions = record["lSolutions"]
        gold = _canonical_number(str(solutions[0])) if solutions else None
        if gold is None:
            raise DataError(f"{ref.where}: field 'lSolutions' is empty or not a number. Restore the file.")
        question = f"{record['sQuestion'].strip()}\n\n{self.prompt_format}"
        return Example(str(record["iIndex"]), question, gold, {})


def format_choices(question: str, options: Sequence[str]) -> str:
    lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return f"{question}\n\n" + "\n".join(lines) + f"\n\n{MultipleChoice.prompt_format}"


def _choice_options(record: dict, where: str) -> tuple[list[str], int]:
    """Return the option texts of an ARC-format record and the index of the gold one."""
    choices = record["choices"]
    texts, labels = choices.get("text"), choices.get("label")
    if not texts or not labels or len(texts) != len(labels) or len(texts) > len(LETTERS):
        raise DataError(f"{where}: field 'choices' needs 1-{len(LETTERS)} texts with one label each.")
    if record["answerKey"] not in labels:
        raise DataError(f"{where}: field 'answerKey' {record['answerKey']!r} is not one of {labels}.")
    return list(texts), labels.index(record["answerKey"])


class MultipleChoice(Task):
    """ARC-format items: choices {text, label} and answerKey; labels "1".."4" are shown as A-D."""

    name = directory = "arc_easy"
    sources = (Source("validation.jsonl", ("validation",)),)
    hub = ("allenai/ai2_arc", "ARC-Easy")
    required = ("id", "question", "choices", "answerKey")
    id_field = "id"
    max_new_tokens = 64  # a letter, or a short reason followed by a letter
    prompt_format = "Answer with the letter of the correct option."

    def make_example(self, record: dict, ref: RecordRef, seed: int) -> Example:
        options, gold = _choice_options(record, ref.where)
        meta = {"choices": options, "letters": LETTERS[: len(options)], "source_labels": record["choices"]["label"]}
        return Example(str(record["id"]), format_choices(record["question"], options), LETTERS[gold], meta)

    def score(self, example: Example, completion: str) -> dict:
        prediction = extract_choice(completion, example.meta["letters"])
        return {"correct": prediction == example.answer, "prediction": prediction}


class SciQ(MultipleChoice):
    """SciQ as four-option multiple choice; the option order is shuffled per item and seed."""

    name = directory = "sciq"
    hub = ("allenai/sciq", None)
    required = ("question", "correct_answer", "distractor1", "distractor2", "distractor3")
    id_field = None

    def make_example(self, record: dict, ref: RecordRef, seed: int) -> Example:
        example_id = f"{ref.stem}-{ref.index}"
        options = [record["correct_answer"], record["distractor1"], record["distractor2"], record["distractor3"]]
        random.Random(f"sciq-options:{seed}:{example_id}").shuffle(options)
        gold = LETTERS[options.index(record["correct_answer"])]
        meta = {"choices": options, "letters": LETTERS[: len(options)], "support": record.get("support", "")}
        return Example(example_id, format_choices(record["question"], options), gold, meta)


class BasicArithmetic(NumberTask):
    """allenai/basic_arithmetic: the gold number is the text of the choice named by answerKey."""

    name = directory = "basic_arithmetic"
    sources = (Source("validation.jsonl", ("validation",)),)
    hub = ("allenai/basic_arithmetic", None)
    required = ("id", "question", "choices", "answerKey")
    id_field = "id"
    max_new_tokens = 32  # room to restate the sum before the result, "33 + 1 = 34"
    prompt_format = "Answer with a number."
    sizes = {"validation": 200, "test": 500}

    def score(self, example: Example, completion: str) -> dict:
        prediction = extract_result_number(completion)
        return {"correct": numbers_equal(prediction, example.answer), "prediction": prediction}

    def make_example(self, record: dict, ref: RecordRef, seed: int) -> Example:
        options, gold = _choice_options(record, ref.where)
        meta = {"type_tag": record.get("type_tag"), "choices": options}
        return Example(str(record["id"]), f"{record['question']}\n{self.prompt_format}", options[gold].strip(), meta)

    def split(self, tables, seed):
        (examples,) = tables.values()
        return _cut(_shuffled(examples, seed, self.name), self.sizes["validation"], self.sizes["test"])


class MBPP(Task):
    """MBPP, scored by pass@1 in the sandbox. Standard task-id split; ids 1-10 are few-shot prompts."""

    name = directory = "mbpp"
    sources = (Source("mbpp.jsonl", ("train", "validation", "test", "prompt")),)
    hub = ("google-research-datasets/mbpp", "full")
    required = ("task_id", "text", "code", "test_list")
    id_field = "task_id"
    max_new_tokens = 384  # 99.9% of the reference solutions, fenced, fit (SmolLM2 tokenizer)
    prompt_format = "Your code should pass these tests: <asserts>. Write the Python function in a ```python block."
    ranges = {"test": range(11, 511), "validation": range(511, 601), "train": range(601, 975)}

    def __init__(self, sandbox: SandboxConfig | None = None):
        self.sandbox = sandbox  # None: SandboxConfig() defaults; set it to change limits or the interpreter

    def make_example(self, record: dict, ref: RecordRef, seed: int) -> Example:
        tests = "\n".join(record["test_list"])
        question = (
            f"{record['text']}\nYour code should pass these tests:\n\n{tests}\n\n"
            "Write the Python function in a ```python code block."
        )
        answer = {
            "test_list": list(record["test_list"]),
            "test_setup_code": record.get("test_setup_code") or "",
            "reference_code": record["code"],
        }
        meta = {"task_id": int(record["task_id"]), "challenge_test_list": record.get("challenge_test_list", [])}
        return Example(str(record["task_id"]), question, answer, meta)

    def split(self, tables, seed):
        (examples,) = tables.values()
        parts = {name: [e for e in examples if e.meta["task_id"] in ids] for name, ids in self.ranges.items()}
        return parts["train"], parts["validation"], parts["test"]

    def score(self, example: Example, completion: str) -> dict:
        return self.score_batch([example], [completion])[0]

    def score_batch(self, examples, completions, workers: int = 2) -> list[dict]:
        codes = [extract_code(completion) for completion in completions]
        problems = [(c, e.answer["test_list"], e.answer["test_setup_code"]) for c, e in zip(codes, examples, strict=True)]
        results = run_python_tests_many(problems, self.sandbox or SandboxConfig(), workers)
        return [{"correct": r.passed, "prediction": c, "status": r.status} for c, r in zip(codes, results)]


class TriviaQA(Task):
    """TriviaQA facts. train is the whole pool in seeded order, so its first N items are the N facts."""

    name = directory = "triviaqa"
    sources = (Source("validation.jsonl", ("validation",)),)
    hub = ("mandarjoshi/trivia_qa", "rc.wikipedia.nocontext")
    required = ("question", "question_id", "answer")
    id_field = "question_id"
    max_new_tokens = 32
    prompt_format = "(question only)"

    def make_example(self, record: dict, ref: RecordRef, seed: int) -> Example:
        answer = record["answer"]
        value = (answer.get("value") or "").strip()
        aliases = [value] + [a for a in answer.get("aliases") or [] if a.strip()]
        if not value and len(aliases) == 1:
            raise DataError(
                f"{ref.where}: fields 'answer.value' and 'answer.aliases' are both empty, so the fact "
                "has no gold answer. Remove the record or restore the file."
            )
        aliases = list(dict.fromkeys(a for a in aliases if a))  # answer[0] is the canonical value
        meta = {"normalized_aliases": list(answer.get("normalized_aliases") or [])}
        return Example(str(record["question_id"]), record["question"].strip(), aliases, meta)

    def split(self, tables, seed):
        (examples,) = tables.values()
        return _shuffled(examples, seed, self.name), [], []

    def score(self, example: Example, completion: str) -> dict:
        prediction = completion.strip()
        exact, contains = match_aliases(prediction, list(example.answer) + example.meta["normalized_aliases"])
        return {"em": exact, "contains": contains, "prediction": prediction}


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        GSM8K(),
        MultipleChoice(),
        SciQ(),
        BasicArithmetic(),
        MBPP(),
        TriviaQA(),
        WordProblem("addsub", "AddSub.json"),
        WordProblem("singleeq", "questions.json"),
    )
}


# The tasks an SVF expert can learn and evaluate.py can score. triviaqa contains the facts to inject.
SKILL_TASKS = tuple(name for name in TASKS if name != "triviaqa")

# Help text of the --hub option of svf.py, inject.py and evaluate.py.
HUB_HELP = "download data sets missing from the data folder from the Hugging Face hub, by their hub names"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}.")
    return TASKS[name]


# ---------------------------------------------------------------------------
# 4. Sandbox for generated code
# ---------------------------------------------------------------------------
#
# What it does:
# - each program runs in a fresh `python -I` child. Isolated mode ignores PYTHON*
#   variables and user site-packages;
# - the working directory is a scratch directory, deleted afterwards, and the
#   environment holds only PATH and LANG;
# - the child gets its own session and limits on address space, CPU time, file
#   size and process count. After the wall-clock timeout its whole process group
#   is killed, and so is any process it left behind after a normal exit;
# - when the evaluator runs as root and `SandboxConfig.user` (default nobody) can
#   run the interpreter, the child runs as that user;
# - a program passes only if it exits 0 and prints the random per-run token that
#   the harness writes after the last assert. So an early sys.exit(0) or
#   os._exit(0) fails.
#
# What it does NOT prevent:
# - network access;
# - reading any file the sandbox user can read, and writing where it can write
#   (/tmp, for example); as root that is the whole machine;
# - a process that calls setsid() leaves the process group and survives the kill;
# - code that inspects the harness's stack frames can find the token;
# - as root (interpreter not usable by an unprivileged user) RLIMIT_NPROC is
#   ignored by the kernel, so a fork bomb is not contained, and the code may raise
#   its own limits.
# It guards an evaluation against mistakes in generated code, not against hostile
# code: use a container or a virtual machine for that.
#
# NOTE: the limits are set by the child's own first statements rather than in a
# Popen preexec_fn, because preexec_fn is unsafe in a multi-threaded parent (torch
# threads, the batched runner). The child's interpreter start-up runs unlimited.

_SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

# Sets the limits given as JSON in argv[1], reads the token from stdin, runs
# program.py as __main__ in a fresh namespace, then writes the token to fd 1
# directly so that a replaced or closed sys.stdout cannot hide it.
_HARNESS = """\
import json, os, resource, sys
for _name, _soft, _hard in json.loads(sys.argv[1]):
    try:
        resource.setrlimit(getattr(resource, _name), (_soft, _hard))
    except (AttributeError, ValueError, OSError) as _error:
        sys.stderr.write(f"sandbox: limit {_name} not set: {_error}\\n")
_token = sys.stdin.readline().strip().encode()
with open("program.py", encoding="utf-8") as _file:
    _code = compile(_file.read(), "program.py", "exec")
exec(_code, {"__name__": "__main__"})
os.write(1, b"\\n" + _token + b"\\n")
"""


def _world_executable(path: str) -> bool:
    """Tell whether every folder on the path and the file itself grant execute to other users."""
    resolved = Path(path).resolve()
    return all(part.stat().st_mode & 0o001 for part in (*resolved.parents, resolved))


def default_sandbox_python() -> str:
    """Return the interpreter for generated code: this one, or a system python3 when running as root.

    An interpreter under /root (a virtual environment there, say) cannot be run
    by an unprivileged account, so the sandbox could not drop root. Generated
    MBPP solutions need only the standard library, which a system python3 has.
    """
    if os.geteuid() != 0 or _world_executable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(candidate).exists() and _world_executable(candidate):
            return candidate
    return sys.executable


@dataclass(frozen=True)
class SandboxConfig:
    timeout_s: float = 10.0  # wall clock per program, seconds
    memory_mb: int = 1024  # RLIMIT_AS: address space of the child, interpreter included
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write, its stdout included
    # RLIMIT_NPROC counts every process and thread of the sandbox user on the machine,
    # not only this program's.
    max_processes: int = 32
    python: str = field(default_factory=default_sandbox_python)  # `user` must be able to run it
    user: str | None = "nobody"  # account used when the evaluator runs as root; None keeps root
    stderr_chars: int = 2000  # how much of the end of stderr to keep


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | exited_early | signal:<NAME>
    stderr_tail: str
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int


@lru_cache(maxsize=None)
def _sandbox_account(python: str, user: str | None) -> _Account | None:
    """Return the unprivileged account to run as, or None to run as the current user."""
    if os.geteuid() != 0:
        return None
    gap = "RLIMIT_NPROC does not bind root, so a fork bomb in generated code is not contained"
    if user is None:
        log.warning("Sandbox runs generated code as root (SandboxConfig.user is None): %s.", gap)
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        log.warning("Sandbox runs generated code as root: user %r not found. %s.", user, gap)
        return None
    account = _Account(user, entry.pw_uid, entry.pw_gid)
    try:
        probe = subprocess.run(
            [python, "-I", "-c", "pass"], cwd="/", env=_SANDBOX_ENV, capture_output=True, timeout=60,
            user=account.uid, group=account.gid, extra_groups=[],
        )
        reason = f"exit status {probe.returncode}" if probe.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as error:
        reason = str(error)
    if reason:
        log.warning(
            "Sandbox runs generated code as root: user %r cannot run %s (%s). %s. "
            "Pass SandboxConfig(python=...) an interpreter that %r can read and execute.",
            user, python, reason, gap, user,
        )
        return None
    return account


def nproc_limit_effective(config: SandboxConfig = SandboxConfig()) -> bool:
    """Tell whether RLIMIT_NPROC binds sandboxed code, i.e. it does not run as root."""
    return os.geteuid() != 0 or _sandbox_account(config.python, config.user) is not None


def _limits(config: SandboxConfig) -> list[tuple[str, int, int]]:
    cpu_s = int(config.timeout_s) + 1  # backs up the wall-clock timeout; SIGXCPU at soft, SIGKILL at hard
    memory = config.memory_mb * 2**20
    files = config.max_file_mb * 2**20
    return [
        ("RLIMIT_AS", memory, memory),
        ("RLIMIT_CPU", cpu_s, cpu_s + 1),
        ("RLIMIT_FSIZE", files, files),
        ("RLIMIT_NPROC", config.max_processes, config.max_processes),
        ("RLIMIT_CORE", 0, 0),
    ]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _wait(process: subprocess.Popen, token: str, timeout_s: float) -> bool:
    """Send the token, wait up to timeout_s, then kill the whole group; return whether it timed out."""
    try:
        process.stdin.write(token.encode() + b"\n")
        process.stdin.close()
    except BrokenPipeError:
        pass  # the child exited before reading, and its exit status records why
    try:
        process.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    # Also on a normal exit: kills background processes the program left behind.
    _kill_group(process.pid)
    process.wait()
    return timed_out


def _status(returncode: int, timed_out: bool, stdout: bytes, token: str) -> str:
    if timed_out:
        return "timeout"
    if returncode < 0:
        return f"signal:{signal.Signals(-returncode).name}"
    if returncode != 0:
        return "failed"
    return "passed" if f"\n{token}\n".encode() in stdout else "exited_early"


def run_program(program: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run one Python program in the sandbox; it passes if it exits 0 after its last statement."""
    account = _sandbox_account(config.python, config.user)
    token = secrets.token_hex(16)
    user_options = {"user": account.uid, "group": account.gid, "extra_groups": []} if account else {}
    with (
        tempfile.TemporaryDirectory(prefix="palora-sandbox-", ignore_cleanup_errors=True) as scratch,
        tempfile.TemporaryFile() as stdout,
        tempfile.TemporaryFile() as stderr,
    ):
        Path(scratch, "program.py").write_text(program, encoding="utf-8")
        if account:
            os.chown(scratch, account.uid, account.gid)
        start = time.monotonic()
        process = subprocess.Popen(
            [config.python, "-I", "-c", _HARNESS, json.dumps(_limits(config))],
            cwd=scratch, env=_SANDBOX_ENV, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr,
            start_new_session=True, close_fds=True, **user_options,
        )
        timed_out = _wait(process, token, config.timeout_s)
        elapsed = time.monotonic() - start
        stdout.seek(0)
        stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - 4 * config.stderr_chars))
        status = _status(process.returncode, timed_out, stdout.read(), token)
        stderr_tail = stderr.read().decode("utf-8", "replace")[-config.stderr_chars :]
    return SandboxResult(status == "passed", status, stderr_tail, elapsed)


def build_test_program(code: str, tests: Sequence[str], setup: str = "") -> str:
    # The setup comes after the solution, because MBPP's setup code builds objects of
    # a class that the solution defines (tasks 367 and 927 build a tree of Node).
    return "\n\n".join(part for part in (code, setup, "\n".join(tests)) if part.strip()) + "\n"


def run_python_tests(
    code: str,
    tests: Sequence[str],
    setup: str = "",
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    config: SandboxConfig | None = None,
) -> SandboxResult:
    """Run `code`, then `setup`, then the assert statements `tests` in the sandbox.

    timeout_s and memory_mb always apply; config supplies the other settings.
    """
    config = replace(config or SandboxConfig(), timeout_s=timeout_s, memory_mb=memory_mb)
    return run_program(build_test_program(code, tests, setup), config)


def run_python_tests_many(
    problems: Sequence[tuple[str, Sequence[str], str]],
    config: SandboxConfig = SandboxConfig(),
    workers: int = 2,
) -> list[SandboxResult]:
    """Run (code, tests, setup) problems, `workers` at a time; results keep the input order."""
    programs = [build_test_program(code, tests, setup) for code, tests, setup in problems]
    _sandbox_account(config.python, config.user)  # probe once, before the threads start
    if workers <= 1 or len(programs) <= 1:
        return [run_program(program, config) for program in programs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda program: run_program(program, config), programs))
