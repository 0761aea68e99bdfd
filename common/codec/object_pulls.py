"""Flower's wait before it asks again for an object that has not arrived yet: 1 s, shortened to 0.05 s.

A Flower 1.42 message travels as a tree of objects (one per array, record and the message itself). Whoever receives
it (a SuperNode pulling a message from the SuperLink, a ClientApp from its SuperNode, a ServerApp's Grid pulling
replies) asks for each object with ``flwr.supercore.inflatable.inflatable_utils.pull_objects`` (directly or through
``pull_and_inflate_object_from_tree``), and when an object
is not there yet (the sender is still pushing it) waits ``initial_backoff`` = 1 s before asking again, doubling up to
10 s. A pull that comes a few milliseconds too early therefore costs a whole second, once on the SuperNode and once
on the coordinator per message. :func:`shorten_object_pull_backoff` makes the first wait 0.05 s in this process; the
doubling, the 10-s cap and the overall time limit stay Flower's, so an object that is really missing is still asked
for ever more rarely. Every Flower caller takes the default (``tests/test_supernode_poll.py`` checks it).
"""

from __future__ import annotations

PROMPT_BACKOFF_S = 0.05
"""The first wait before asking again for an object that has not arrived."""


def shorten_object_pull_backoff() -> str:
    """Set ``pull_objects``'s first backoff to :data:`PROMPT_BACKOFF_S` in this process; "" or why it could not."""
    from flwr.supercore.inflatable import inflatable_utils

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    defaults = [function.__kwdefaults__ or {} for function in functions]
    for function, kwdefaults in zip(functions, defaults, strict=True):
        if not isinstance(kwdefaults.get("initial_backoff"), int | float):
            return f"flwr's {function.__name__} has no initial_backoff to shorten"
    for kwdefaults in defaults:
        kwdefaults["initial_backoff"] = PROMPT_BACKOFF_S
    return ""
