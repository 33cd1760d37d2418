"""Rank 0 leads, the other tensor-parallel ranks follow: one model over several processes behind one lm-eval.

lm-eval is a single-process program: it asks its model for results and expects them back. With tensor
parallelism every rank must run the same forward passes in the same order, so rank 0 (the model lm-eval talks to)
broadcasts each unit of work — a command name and its arguments, already tokenised — before doing it itself, and
the other ranks run the same command on their shards. When rank 0's process ends, for any reason it can still
act on, it broadcasts ``exit``; the followers then leave too. A broadcast of Python objects runs over a gloo group
of its own, whatever the device's backend.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable

EXIT = "exit"
_leading: list[Lockstep] = []  # this process's leaders, released by release_all


class Lockstep:
    """``lead(name, args)`` on rank 0 runs ``commands[name](*args)`` on every rank and returns rank 0's result;
    ``follow()`` on the other ranks runs what rank 0 leads until it exits. With one process there is nothing to
    broadcast: ``lead`` just runs the command."""

    def __init__(self, commands: dict[str, Callable]) -> None:
        import torch.distributed as dist

        self.commands = commands
        self.group = None
        self.leads = True
        self.done = False
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")  # every rank, at the same point: a collective call
            self.leads = dist.get_rank() == 0
            if self.leads:
                _leading.append(self)
                atexit.register(self.release)

    def lead(self, name: str, args: tuple):
        if self.group is not None:
            self._broadcast((name, args))
        return self.commands[name](*args)

    def follow(self) -> None:
        """Run rank 0's commands until it sends ``exit`` (or its process is gone and the broadcast fails)."""
        while True:
            name, args = self._broadcast(None)
            if name == EXIT:
                return
            self.commands[name](*args)

    def release(self) -> None:
        """Tell the followers to leave (once; registered to run when rank 0's interpreter exits)."""
        if self.group is not None and self.leads and not self.done:
            self.done = True
            self._broadcast((EXIT, ()))

    def _broadcast(self, message):
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def release_all() -> None:
    """Release every leader of this process (before its process group is destroyed)."""
    while _leading:
        _leading.pop().release()
