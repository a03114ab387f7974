"""Sandbox for generated code: failures of every kind are contained and the next run still works."""

import os
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tasks  # noqa: E402
from tasks import SandboxConfig, run_program, run_python_tests, run_python_tests_many  # noqa: E402

CORRECT_CODE = "def add(a, b):\n    return a + b\n"
WRONG_CODE = "def add(a, b):\n    return a - b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]
SYSTEM_PYTHON = "/usr/bin/python3"


def _configs():
    """The current interpreter, plus an unprivileged run of the system one when that is possible."""
    configs = [pytest.param(SandboxConfig(), id="current-python")]
    unprivileged = SandboxConfig(python=SYSTEM_PYTHON)
    if os.geteuid() == 0 and Path(SYSTEM_PYTHON).exists() and tasks.nproc_limit_effective(unprivileged):
        configs.append(pytest.param(unprivileged, id="system-python-unprivileged"))
    return configs


@pytest.fixture(params=_configs())
def config(request):
    return request.param


def _assert_still_works(config):
    result = run_python_tests(CORRECT_CODE, TESTS, config=config)
    assert result.passed, f"a correct solution failed after the previous run: {result}"


def _process_gone(pid: int, wait_s: float = 5.0) -> bool:
    """True once pid no longer exists or is a zombie waiting to be reaped."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _pids_in(stderr: str, label: str) -> list[int]:
    match = re.search(rf"{label}:([\d ]*)", stderr)
    assert match, f"the program did not report '{label}' pids; stderr: {stderr!r}"
    return [int(pid) for pid in match.group(1).split()]


def test_correct_solution_passes(config):
    result = run_python_tests(CORRECT_CODE, TESTS, config=config)
    assert result.passed
    assert result.status == "passed"


def test_wrong_solution_fails(config):
    result = run_python_tests(WRONG_CODE, TESTS, config=config)
    assert not result.passed
    assert result.status == "failed"
    assert "AssertionError" in result.stderr_tail


def test_syntax_error_fails(config):
    result = run_python_tests("def add(a, b)\n    return a + b\n", TESTS, config=config)
    assert result.status == "failed"
    assert "SyntaxError" in result.stderr_tail
    _assert_still_works(config)


def test_setup_runs_after_code(config):
    code = "class Node:\n    def __init__(self, value):\n        self.value = value\n"
    result = run_python_tests(code, ["assert root.value == 1"], setup="root = Node(1)", config=config)
    assert result.passed, result


def test_infinite_loop_stopped_in_time(config):
    limit_s = 2.0
    start = time.monotonic()
    result = run_python_tests("while True:\n    pass\n", TESTS, timeout_s=limit_s, config=config)
    elapsed = time.monotonic() - start
    assert result.status == "timeout"
    assert not result.passed
    assert elapsed < limit_s + 2.0, f"timeout of {limit_s} s took {elapsed:.1f} s"
    _assert_still_works(config)


def test_sleep_stopped_by_wall_clock(config):
    limit_s = 1.0
    start = time.monotonic()
    result = run_python_tests("import time\ntime.sleep(600)\n", TESTS, timeout_s=limit_s, config=config)
    assert result.status == "timeout"
    assert time.monotonic() - start < limit_s + 2.0


def test_huge_allocation_fails(config):
    result = run_python_tests("block = bytearray(10 * 2**30)\n" + CORRECT_CODE, TESTS, config=config)
    assert not result.passed
    assert "MemoryError" in result.stderr_tail
    _assert_still_works(config)


def test_growing_allocation_fails(config):
    code = "chunks = []\nwhile True:\n    chunks.append(' ' * 10**7)\n"
    result = run_python_tests(code, TESTS, memory_mb=256, config=config)
    assert not result.passed
    assert result.status in ("failed", "signal:SIGKILL", "signal:SIGSEGV")
    _assert_still_works(config)


@pytest.mark.parametrize(
    "early_exit", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n"]
)
def test_exit_before_asserts_fails(config, early_exit):
    result = run_python_tests(WRONG_CODE + early_exit, TESTS, config=config)
    assert not result.passed
    assert result.status == "exited_early"
    _assert_still_works(config)


def test_replaced_stdout_still_passes(config):
    code = "import io, sys\nsys.stdout = io.StringIO()\nsys.stdout.close()\n" + CORRECT_CODE
    result = run_python_tests(code, TESTS, config=config)
    assert result.passed, result


def test_large_output_stopped(config):
    code = "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2**20)\n" + CORRECT_CODE
    result = run_python_tests(code, TESTS, config=replace(config, max_file_mb=4))
    assert not result.passed
    assert result.status in ("signal:SIGXFSZ", "failed")
    _assert_still_works(config)


def test_environment_is_minimal(config, monkeypatch):
    monkeypatch.setenv("PALORA_SANDBOX_PARENT_VARIABLE", "visible")
    checks = [
        "import os, sys",
        "assert 'PALORA_SANDBOX_PARENT_VARIABLE' not in os.environ, sorted(os.environ)",
        "assert os.environ['PATH'] == '/usr/bin:/bin'",
        "assert sys.flags.isolated == 1",
    ]
    result = run_python_tests("", checks, config=config)
    assert result.passed, result


def test_limits_are_applied(config):
    checks = [
        "import resource",
        f"assert resource.getrlimit(resource.RLIMIT_AS) == ({512 * 2**20}, {512 * 2**20})",
        f"assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == {config.max_file_mb * 2**20}",
        "assert resource.getrlimit(resource.RLIMIT_CPU)[0] == 4",
        f"assert resource.getrlimit(resource.RLIMIT_NPROC)[0] == {config.max_processes}",
    ]
    result = run_python_tests("", checks, timeout_s=3.0, memory_mb=512, config=config)
    assert result.passed, result


def test_scratch_directory_deleted(config):
    result = run_python_tests("import os, sys\nsys.exit('cwd=' + os.getcwd())\n", TESTS, config=config)
    assert result.status == "failed"
    match = re.search(r"cwd=(\S+)", result.stderr_tail)
    assert match, result.stderr_tail
    scratch = Path(match.group(1))
    assert scratch.name.startswith("palora-sandbox-")
    assert not scratch.exists()


def test_background_child_killed_after_exit(config):
    sleep = shutil.which("sleep", path="/usr/bin:/bin")
    if sleep is None:
        pytest.skip("no sleep executable in /usr/bin or /bin")
    code = (
        "import subprocess, sys\n"
        f"child = subprocess.Popen([{sleep!r}, '600'])\n"
        "sys.stderr.write(f'children:{child.pid}\\n')\n"
    )
    result = run_python_tests(code + CORRECT_CODE, TESTS, config=config)
    assert result.passed, result
    (pid,) = _pids_in(result.stderr_tail, "children")
    assert _process_gone(pid), f"background process {pid} outlived the program"


def test_background_child_killed_on_timeout(config):
    sleep = shutil.which("sleep", path="/usr/bin:/bin")
    if sleep is None:
        pytest.skip("no sleep executable in /usr/bin or /bin")
    code = (
        "import subprocess, sys\n"
        f"child = subprocess.Popen([{sleep!r}, '600'])\n"
        "sys.stderr.write(f'children:{child.pid}\\n')\n"
        "sys.stderr.flush()\n"
        "while True:\n    pass\n"
    )
    result = run_python_tests(code, TESTS, timeout_s=1.5, config=config)
    assert result.status == "timeout"
    (pid,) = _pids_in(result.stderr_tail, "children")
    assert _process_gone(pid), f"background process {pid} survived the timeout"


def test_bounded_fork_stopped_by_process_limit():
    """At most 64 forks: harmless even where the limit does not hold, and skipped there anyway."""
    config = next((p.values[0] for p in _configs() if tasks.nproc_limit_effective(p.values[0])), None)
    if config is None:
        pytest.skip(
            "RLIMIT_NPROC does not bind here: the sandbox runs as root because no interpreter "
            "is usable by an unprivileged user"
        )
    config = replace(config, max_processes=8)
    attempts = 64

    code = (
        "import os, sys, time\n"
        "pids = []\n"
        "try:\n"
        f"    for _ in range({attempts}):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        pids.append(pid)\n"
        "finally:\n"
        "    sys.stderr.write('children:' + ' '.join(map(str, pids)) + '\\n')\n"
    )
    result = run_python_tests(code + CORRECT_CODE, TESTS, timeout_s=10.0, config=config)

    assert not result.passed
    assert result.status == "failed"
    assert "BlockingIOError" in result.stderr_tail or "Resource temporarily unavailable" in result.stderr_tail

    children = _pids_in(result.stderr_tail, "children")
    assert len(children) < attempts
    assert all(_process_gone(pid) for pid in children), "forked children outlived the program"
    _assert_still_works(config)


def test_many_keeps_order_and_isolates_failures(config):
    problems = [
        (CORRECT_CODE, TESTS, ""),
        ("import os\nos._exit(0)\n", TESTS, ""),
        (WRONG_CODE, TESTS, ""),
        ("block = bytearray(10 * 2**30)\n", TESTS, ""),
        (CORRECT_CODE, TESTS, ""),
    ]
    results = run_python_tests_many(problems, config, workers=2)
    assert [r.status for r in results] == ["passed", "exited_early", "failed", "failed", "passed"]


def test_many_sequential_matches_parallel(config):
    problems = [(CORRECT_CODE, TESTS, ""), (WRONG_CODE, TESTS, "")] * 2
    sequential = [r.passed for r in run_python_tests_many(problems, config, workers=1)]
    parallel = [r.passed for r in run_python_tests_many(problems, config, workers=2)]
    assert sequential == parallel == [True, False, True, False]


def test_program_without_tests_passes():
    result = run_program("x = 1\n")
    assert result.passed
