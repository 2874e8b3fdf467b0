"""Threads: the runs a lineage of responses is cut into, so its history is read a run at a time.

A response's thread is the id of the thread's first response. A turn continues its parent's thread when
it is the first child there; a second child of the same parent (a fork), a response without a parent and
a conversation turn (whose history is its conversation's items) start threads of their own. So within a
thread each depth holds one response, the child of the one before it, and the history of a response is
its thread's items up to its depth, then those of its thread's first response's parent, read the same
way: one range of the items index for a straight chain, k + 1 for a history with k forks.
"""

from __future__ import annotations


def choose_thread(response_id: str, parent_thread: str | None, *, parent_thread_taken: bool) -> str:
    """The thread of a new response. `parent_thread`: that of the response it continues by
    `previous_response_id` (None for a root or a conversation turn); `parent_thread_taken`: another child
    of that parent already holds the depth after it in that thread."""
    if parent_thread is None or parent_thread_taken:
        return response_id
    return parent_thread
