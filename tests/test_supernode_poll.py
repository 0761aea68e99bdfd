"""``client.supernode_poll``: Flower's own SuperNode, taking the next message within 0.2 s of a reply instead of 3 s.

The patch relies on two waits in flwr 1.42's SuperNode loop; the first test fails if a new flwr moves them, so the
patch can never become a silent no-op."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.supernode_poll import IDLE_SLEEP_S, PROMPT_POLL_S, REPLY_CHECK_S, PromptClock


def in_fresh_process(code: str) -> None:
    """Run ``code`` in a new interpreter (the patches change Flower's module state) and check it printed ok."""
    done = subprocess.run([sys.executable, "-c", code + "print('ok')\n"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_every_flower_caller_of_pull_objects_takes_the_backoff_the_patch_shortens() -> None:
    import flwr

    root = Path(flwr.__file__).parent
    sources = [p.read_text(encoding="utf-8") for p in root.rglob("*.py")]
    for name in ("pull_objects", "pull_and_inflate_object_from_tree"):
        calls = [c for s in sources for c in re.findall(rf"[^f] {name}\((.*?)\n\s*\)", s, re.S)]
        # the one call that passes it on is pull_and_inflate_object_from_tree's own (its default, patched too)
        passing = [c for c in calls if "initial_backoff" in c]
        assert calls and passing in ([], [c for c in calls if "initial_backoff=initial_backoff" in c]), calls
        assert len(passing) <= 1
    code = (
        "from common.codec.object_pulls import shorten_object_pull_backoff as s\n"
        "from flwr.supercore.inflatable.inflatable_utils import pull_objects as p\n"
        "assert p.__kwdefaults__['initial_backoff'] == 1\n"
        "from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree as t\n"
        "assert s() == '' and p.__kwdefaults__['initial_backoff'] == t.__kwdefaults__['initial_backoff'] == 0.05\n"
    )
    in_fresh_process(code)


def test_flwr_s_supernode_loop_still_has_the_waits_the_patch_shortens() -> None:
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    assert re.findall(r"time\.sleep\(([\d.]+)\)", source) == ["3", "0.5", "0.5"]
    assert "_push_messages(" in inspect.getsource(loop.start_client_internal)


def test_the_idle_sleep_is_short_only_within_the_window_after_a_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = PromptClock(window_s=10.0)
    clock.sleep(IDLE_SLEEP_S)  # no reply yet: Flower's 3 s
    clock.last_reply = time.monotonic()
    clock.sleep(IDLE_SLEEP_S)
    clock.sleep(REPLY_CHECK_S)
    clock.sleep(1.25)  # any other wait is left alone
    clock.last_reply = time.monotonic() - 11.0
    clock.sleep(IDLE_SLEEP_S)
    assert slept == [IDLE_SLEEP_S, PROMPT_POLL_S, 0.05, 1.25, IDLE_SLEEP_S]
    assert clock.monotonic is time.monotonic  # every other attribute is the time module's


def test_install_patches_the_loop_and_a_push_opens_the_window() -> None:
    code = (
        "import time\n"
        "from client.supernode_poll import install, PromptClock\n"
        "from flwr.supernode import start_client_internal as loop\n"
        "loop._push_messages = lambda *a, **k: None\n"
        "assert install(5.0) == ''\n"
        "assert isinstance(loop.time, PromptClock) and loop.time.last_reply == float('-inf')\n"
        "loop._push_messages(None, None, None, None)\n"
        "assert time.monotonic() - loop.time.last_reply < 1.0\n"
        "from client.clientapp_forks import SuperExecByFork\n"
        "assert isinstance(loop.subprocess, SuperExecByFork)\n"
    )
    in_fresh_process(code)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt-window", "-1", "--", "--insecure"], "--prompt-window must be a positive number of seconds"),
        (["--prompt-window", "soon", "--"], "--prompt-window must be a positive number of seconds, got 'soon'"),
        (["--superlink", "x:1"], "usage: python -m client.supernode_poll --prompt-window S --"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "client.supernode_poll", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and message in done.stderr
