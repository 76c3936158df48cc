"""Peak bytes of what a forward and backward pass creates: tensors that operations make while
it is active and that are still alive, the parameters excluded. Counted the same way on real
tensors (what a CPU run allocates) and on the meta device (a model too large for the
machine), so the memory planner's figures and the benchmark's measurements mean the same thing.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Use as a context around a forward and backward pass of `model`. A storage counts from
    the operation that creates it until it is freed, or until autograd accumulates it into a
    parameter's `.grad` (it is a gradient from then on).

    `peak`: the most bytes alive at once, a parameter's gradient included while it is in
    flight (computed, not yet accumulated); `peak_without_gradients`: the same with every
    storage that became a gradient left out (the activations alone)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.current = self.peak = 0
        self._counting = True
        self._tokens = itertools.count()
        self._live: dict[int, tuple[int, int]] = {}  # id of a live counted storage -> (token, bytes)
        self._events: list[tuple[int, int]] = []  # (token, +bytes at creation / -bytes when no longer counted)
        self._gradients: set[int] = set()  # tokens of storages that became gradients
        self._excluded = {id(p.untyped_storage()) for p in model.parameters()}  # and gradients, while alive
        self._hooks = [p.register_post_accumulate_grad_hook(self._gradient) for p in model.parameters()
                       if p.requires_grad]

    @contextlib.contextmanager
    def paused(self):
        """Storages created inside are not counted (an optimizer step between passes)."""
        self._counting = False
        try:
            yield
        finally:
            self._counting = True

    def _release(self, key: int) -> int | None:
        if key not in self._live:
            self._excluded.discard(key)  # a gradient freed
            return None
        token, size = self._live.pop(key)
        self.current -= size
        self._events.append((token, -size))
        return token

    def _gradient(self, param: torch.Tensor) -> None:
        key = id(param.grad.untyped_storage())
        token = self._release(key)
        if token is not None:
            self._gradients.add(token)
            self._excluded.add(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._counting:
            return out
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, size = id(storage), storage.nbytes()
                if key in self._live or key in self._excluded or key in inputs or not size:  # views, in-place
                    continue
                token = next(self._tokens)
                self._live[key] = (token, size)
                self._events.append((token, size))
                weakref.finalize(storage, self._release, key)
                self.current += size
                self.peak = max(self.peak, self.current)
        return out

    @property
    def peak_without_gradients(self) -> int:
        current = peak = 0
        for token, size in self._events:
            if token not in self._gradients:
                current += size
                peak = max(peak, current)
        return peak

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)
