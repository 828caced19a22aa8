"""Several LoRA adapters in one batch, through gathered adapter weights.

Every adapted linear layer holds the loaded adapters side by side in `max_loras` slots of
`max_rank` columns each: A (slots*r, in) and B^T (slots*r, out), the scaling folded into B,
ranks below `max_rank` zero-padded. For a batch whose row i uses slot s_i (or none),

    delta = ((x @ A^T) * onehot_cols(s)) @ B^T

is two matmuls for the whole batch: each row's low-rank projection is kept only in its own
slot's columns, so the second matmul adds exactly that adapter's delta (the other columns are
exact zeros, a row without an adapter gets an exact +0). The base matmul runs once for the
whole batch; there are no per-adapter sub-batches and no per-call state on the modules. The
cost grows with the number of loaded slots (each step reads every loaded adapter once, like
the base weights), not with the number of rows. The columns read are those up to the highest
loaded slot, fixed between loads, so a row's arithmetic does not depend on its neighbours.

`Selection` is the one object the engine sets per forward (the rows' column mask); every
`SlotStack` reads it. Outside an engine forward it is empty and the layers run as before.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.lora import LoRALinear, lora_modules


class Selection:
    """Per-forward row -> adapter column mask shared by every stacked layer."""

    def __init__(self, max_loras: int, max_rank: int) -> None:
        self.max_loras, self.max_rank = max_loras, max_rank
        self.mask: torch.Tensor | None = None  # (B, 1, cols) during a forward with adapters
        self.base_only = False  # during a forward where no row uses an adapter
        self.cols = 0  # columns in use: (highest loaded slot + 1) * max_rank

    @property
    def running(self) -> bool:
        """Whether an engine forward is in progress."""
        return self.base_only or self.mask is not None

    def set_rows(self, slots: list[int | None], dtype: torch.dtype, device: torch.device) -> None:
        """Row i uses adapter slot slots[i] (None: the base alone) until `clear`."""
        if all(s is None for s in slots) or self.cols == 0:
            self.base_only = True
            return
        r = self.max_rank
        col_slot = torch.arange(self.cols, device=device) // r  # (cols,)
        want = torch.tensor([-1 if s is None else s for s in slots], device=device)
        self.mask = (col_slot[None, :] == want[:, None]).to(dtype)[:, None, :]  # (B, 1, cols)

    def clear(self) -> None:
        """End of the forward: layers go back to their own adapters."""
        self.mask, self.base_only = None, False


class SlotStack:
    """Gathered adapter weights of one LoRALinear (installed as its `gathered`)."""

    def __init__(self, layer: LoRALinear, selection: Selection, dtype: torch.dtype) -> None:
        cols = selection.max_loras * selection.max_rank
        dev = layer.device
        self.selection = selection
        self.a = torch.zeros(cols, layer.in_features, dtype=dtype, device=dev)  # (cols, in)
        self.bt = torch.zeros(cols, layer.out_features, dtype=dtype, device=dev)  # (cols, out)

    @property
    def running(self) -> bool:
        """Whether this layer should add gathered deltas now (LoRALinear.forward asks)."""
        return self.selection.running

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + each row's adapter delta; x (B, T, in), y (B, T, out)."""
        sel = self.selection
        if sel.mask is None:
            return y
        c = sel.cols
        h = torch.matmul(x.to(self.a.dtype), self.a[:c].T).mul_(sel.mask)  # (B, T, cols)
        if y.dtype != self.bt.dtype:
            return y + torch.matmul(h, self.bt[:c]).to(y.dtype)
        # y + h @ B^T in one matmul-with-add (3 kernels per layer in all)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, c), self.bt[:c])
        return out.view(y.shape)

    def write(self, slot: int, layer: LoRALinear, name: str | None) -> None:
        """Copy adapter `name` of the layer into `slot` (None, or absent there: zeros)."""
        r = self.selection.max_rank
        rows = slice(slot * r, (slot + 1) * r)
        with torch.no_grad():
            self.a[rows].zero_()
            self.bt[rows].zero_()
            if name is None or name not in layer.lora_A:
                return
            a, b = layer.lora_A[name], layer.lora_B[name]  # (r_a, in), (out, r_a)
            ra = a.shape[0]
            self.a[slot * r : slot * r + ra] = a.to(self.a.dtype)
            scaled = b.float() * layer.scaling[name]
            self.bt[slot * r : slot * r + ra] = scaled.T.to(self.bt.dtype)


class AdapterStacks:
    """Every stacked layer of a model and the slot each adapter name occupies."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype) -> None:
        if max_loras < 0 or max_rank < 1:
            raise ValueError(f"max_loras must be >= 0 and max_rank >= 1 ({max_loras}, {max_rank})")
        self.model, self.dtype = model, dtype
        self.selection = Selection(max_loras, max_rank)
        self.stacks: dict[str, SlotStack] = {}
        self.slots: dict[str, int] = {}

    def _stack(self, module_name: str, layer: LoRALinear) -> SlotStack:
        stack = self.stacks.get(module_name)
        if stack is None:
            stack = self.stacks[module_name] = SlotStack(layer, self.selection, self.dtype)
            for name, slot in self.slots.items():  # a layer new to the stacks: copy old ones
                stack.write(slot, layer, name)
            layer.gathered = stack
        return stack

    def add(self, name: str) -> int:
        """Copy adapter `name` (already in the model's LoRA layers) into a free slot."""
        if name in self.slots:
            raise ValueError(f"adapter {name!r} is already stacked")
        free = sorted(set(range(self.selection.max_loras)) - set(self.slots.values()))
        if not free:
            raise ValueError(f"all {self.selection.max_loras} adapter slots are in use")
        rank = max((m.rank[name] for _, m in lora_modules(self.model) if name in m.rank), default=0)
        if rank == 0:
            raise ValueError(f"no LoRA layer of the model holds adapter {name!r}")
        if rank > self.selection.max_rank:
            raise ValueError(
                f"adapter {name!r} has rank {rank} > max rank {self.selection.max_rank}"
            )
        slot = free[0]
        self.slots[name] = slot
        for module_name, layer in lora_modules(self.model):
            self._stack(module_name, layer).write(slot, layer, name)
        self._update_cols()
        return slot

    def refresh(self, name: str) -> None:
        """Copy adapter `name` again from the LoRA layers (after its weights changed)."""
        slot = self.slots[name]
        for module_name, layer in lora_modules(self.model):
            self._stack(module_name, layer).write(slot, layer, name)

    def remove(self, name: str) -> None:
        """Zero and free the slot of adapter `name`."""
        slot = self.slots.pop(name)
        for module_name, layer in lora_modules(self.model):
            self._stack(module_name, layer).write(slot, layer, None)
        self._update_cols()

    def _update_cols(self) -> None:
        top = max(self.slots.values(), default=-1)
        self.selection.cols = (top + 1) * self.selection.max_rank

    def detach(self) -> None:
        """Uninstall from every layer (they run their own adapters again)."""
        for _, layer in lora_modules(self.model):
            if isinstance(layer.gathered, SlotStack) and layer.gathered.selection is self.selection:
                layer.gathered = None
        self.stacks.clear()
