"""Optimizer-state eviction for layers that are not being trained.

``"keep"``
    leave every layer's state where it is (what plain AdamW does).
``"offload"``
    move the state of layers not selected for the coming step to host memory
    (pinned on CUDA, non-blocking copies) and bring it back when the layer is
    selected again. Exact: the trajectory equals ``"keep"`` bit for bit.
``"drop"``
    delete the state of layers not selected for the coming step. Their moments
    (and AdamW's step count, hence bias correction) restart the next time they
    train. Not exact; the least memory.

When it happens: the selection for step ``t+1`` is drawn at the end of step
``t``; right then the layers leaving the selection are evicted and the ones
entering it are restored. A layer selected in consecutive steps never moves.

On CUDA the copies are issued on the current (compute) stream, non-blocking
(pinned host buffers), so they are ordered with the optimizer step that reads
or writes that state and the host does not wait for them. They do not overlap
with compute: the stream runs them between the step and the next forward, so
in full-layer mode a step with large state pays for its PCIe traffic. Host
state is read only after :meth:`StateEvictor.synchronize` (``state_dict``,
deepcopy and pickle call it; so must anyone reading ``opt.state`` directly),
which waits on every device a copy was issued from. An evicted device tensor
is marked used by the current stream (``record_stream``), so the caching
allocator does not hand its memory out before its copy has run, whichever
stream it was allocated on. No GPU has run this path yet (issue 20):
``state_policy="auto"`` keeps the state until ``bench/gpu_check.py`` has shown
offload equal to keep there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim import Optimizer

__all__ = ["STATE_POLICIES", "StateEvictor"]

STATE_POLICIES = ("keep", "offload", "drop")


class StateEvictor:
    """Moves or drops the wrapped optimizer's per-parameter state, layer by layer.

    Args:
        optimizer: the wrapped optimizer (its ``state`` is edited in place).
        layer_params: ``L`` lists of parameters, one per layer.
        policy: ``"keep"``, ``"offload"`` or ``"drop"``.

    Attributes:
        evicted: the set of layers whose state is offloaded or dropped.
    """

    def __init__(self, optimizer: Optimizer, layer_params: Sequence[Sequence[torch.Tensor]], policy: str):
        if policy not in STATE_POLICIES:
            raise ValueError(f"Invalid state_policy: {policy!r} (expected one of {STATE_POLICIES})")
        self.optimizer = optimizer
        self.layer_params = layer_params
        self.policy = policy
        self.evicted: set[int] = set()
        self.copy_devices: set[torch.device] = set()  # CUDA devices with non-blocking copies issued

    def apply(self, flags: Sequence[bool]) -> None:
        """Make the state of layers with ``flags[i]`` resident and evict the others."""
        if self.policy == "keep":
            return
        for layer, train in enumerate(flags):
            if train and layer in self.evicted:
                self._restore(layer)
            elif not train and layer not in self.evicted:
                self._evict(layer)

    def reset(self) -> None:
        """Forget what was evicted (after ``load_state_dict`` put all state back on the device)."""
        self.evicted.clear()

    def synchronize(self) -> None:
        """Wait for the non-blocking copies on every device they were issued from, before host state is read."""
        if self.policy == "offload" and self.copy_devices and torch.cuda.is_available():
            for device in sorted(self.copy_devices, key=str):
                torch.cuda.synchronize(device)

    def _evict(self, layer: int) -> None:
        state = self.optimizer.state
        for p in self.layer_params[layer]:
            if p not in state:
                continue
            if self.policy == "drop":
                del state[p]
                continue
            entry = state[p]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.device == p.device and value.dim() > 0:
                    entry[key] = _to_host(value)
                    if value.is_cuda:
                        _mark_used_by_current_stream(value)
                        self.copy_devices.add(value.device)
        self.evicted.add(layer)

    def _restore(self, layer: int) -> None:
        if self.policy == "offload":
            state = self.optimizer.state
            for p in self.layer_params[layer]:
                entry = state.get(p)
                if not entry:
                    continue
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        entry[key] = value.to(p.device, non_blocking=True)
                        if entry[key].is_cuda:
                            self.copy_devices.add(entry[key].device)
        self.evicted.discard(layer)

    def memory_report(self, params_with_grads: Sequence[torch.Tensor]) -> dict[str, int]:
        """Bytes of optimizer state resident on the parameters' device, on host, and of gradients.

        On a CPU-only run "device" and "host" are the same memory; the split
        then says which state IST holds as evicted.
        """
        device_bytes = host_bytes = 0
        evicted_params = {id(p) for layer in self.evicted for p in self.layer_params[layer]}
        for p, entry in self.optimizer.state.items():
            for value in entry.values():
                if not isinstance(value, torch.Tensor):
                    continue
                size = _local_bytes(value)  # a DTensor's own shard under FSDP2, not its global size
                if value.device == p.device and id(p) not in evicted_params:
                    device_bytes += size
                else:
                    host_bytes += size
        grad_bytes = sum(_local_bytes(p.grad) for p in params_with_grads if p.grad is not None)
        return {
            "optimizer_state_device_bytes": device_bytes,
            "optimizer_state_host_bytes": host_bytes,
            "grad_bytes": grad_bytes,
        }


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy (pinned and non-blocking from CUDA; a real copy on CPU too, so the path is the same)."""
    if _is_dtensor(tensor):
        # FSDP2 state is sharded like its parameter: offload this rank's shard, keep it a DTensor
        # (as FSDP2's own CPU offload does) so checkpoints see the same layout for evicted state.
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            _to_host(tensor.to_local()),
            tensor.device_mesh,
            tensor.placements,
            run_check=False,
            shape=tensor.shape,
            stride=tensor.stride(),
        )
    pinned = tensor.is_cuda and torch.cuda.is_available()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pinned)
    host.copy_(tensor, non_blocking=pinned)
    return host


def _mark_used_by_current_stream(tensor: torch.Tensor) -> None:
    """Keep ``tensor``'s memory from reuse until the work queued on the current stream (its copy) has run."""
    local = tensor.to_local() if _is_dtensor(tensor) else tensor
    local.record_stream(torch.cuda.current_stream(local.device))


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if _is_dtensor(tensor) else tensor
    return local.numel() * local.element_size()


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)
