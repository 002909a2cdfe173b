"""The worker's cleanup after a program (issue 28, item 9): a correct program that leaves a directory tree
1,100 levels deep (deeper than Python's recursion limit, where `shutil.rmtree` fails) in its work dir or in
the private /tmp is judged correct on the first worker, and the worker goes on judging."""

from __future__ import annotations

import pytest

from envs.execute import Executor
from envs.problem import TestSpec

DEEP = ("import os\nos.chdir({where!r})\nfor _ in range(1100):\n    os.mkdir('d')\n    os.chdir('d')\n"
        "    open('f', 'w').close()\n    os.symlink('/', 'root')\n")
ANSWER = "print(sum(map(int, input().split())))\n"
STDIO = TestSpec("stdio", cases=({"input": "2 3\n", "output": "5\n"},))


@pytest.mark.parametrize("where", [".", "/tmp"])
def test_deep_directory_tree_does_not_break_cleanup(where):
    with Executor(workers=1) as ex:
        res = ex.run(DEEP.format(where=where) + ANSWER, STDIO)
        assert (res.outcome.value, res.attempts) == ("passed", 1), res.error
        pids = ex.worker_pids
        look = "import os\nprint(os.listdir('.'), os.path.exists('/tmp/d'))\n"
        after = ex.run(look, TestSpec("stdio", cases=({"input": "", "output": "[] False\n"},)))
        assert after.outcome.value == "passed", after.error  # the same worker, and nothing left behind
        assert ex.worker_pids == pids
