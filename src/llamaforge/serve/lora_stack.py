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

Layers that read the same input (q/k/v of an attention, gate/up of an MLP) share one
`SharedShrink`: their A blocks live in one buffer, column-major over the members, so the
first member's call computes x A^T and the mask for all of them in one matmul and one
multiply, and the others take their slice (on the batched path, 15 launches a layer
instead of 21). Their B^T blocks live side by side in one (cols, sum of outputs) buffer too,
in the members' order, so a fused projection over the stacked base weights
(`serve/fused_proj.py`) adds every member's delta from one tensor.

At one decode row the kernels of `kernels/gemv.py` take over (`SlotStack.one_row`,
`one_row_linear`): a split-K shrink of the row's own slot only (its first column `col0` a
device tensor, so one captured graph serves every slot) and a GEMV that adds the expansion
in its epilogue.

`Selection` is the one object the engine sets per forward (the rows' column mask, and at
one row the row's first column); every `SlotStack` reads it. Outside an engine forward it
is empty and the layers run as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..adapters.lora import LoRALinear, lora_modules
from ..kernels import interpreting, triton_available
from ..kernels.gemv import gemv_lora_triton, shrink_triton

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class Selection:
    """Per-forward row -> adapter column mask shared by every stacked layer."""

    def __init__(self, max_loras: int, max_rank: int) -> None:
        self.max_loras, self.max_rank = max_loras, max_rank
        self.mask: torch.Tensor | None = None  # (B, 1, cols) during a forward with adapters
        self.base_only = False  # during a forward where no row uses an adapter
        self.gemv = False  # one-row forward: base matmul + delta in one kernel (kernels/gemv.py)
        # one-row forward: (1,) int64 on the device, the row's first adapter column: the
        # one-row kernels read only that slot's max_rank columns (no mask, no other slots)
        self.col0: torch.Tensor | None = None
        self.cols = 0  # columns in use: (highest loaded slot + 1) * max_rank
        self.groups: list[SharedShrink] = []  # their cached projections end with the forward

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
        self.mask, self.base_only, self.gemv, self.col0 = None, False, False, None
        for group in self.groups:
            group.forget()


class SharedShrink:
    """The masked x A^T of M layers that read the same input, in one matmul.

    A is (cols, M, in): row block j holds every member's column j, so the columns in use
    are one contiguous prefix for all members. `shrink(x, m)` computes all members' masked
    projections on the first call with a new `x` (kept until the forward ends) and returns
    member m's (..., cols) slice.
    """

    def __init__(self, out_features: list[int], in_features: int, selection: Selection,
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        cols = selection.max_loras * selection.max_rank
        members = len(out_features)
        self.selection, self.members = selection, members
        self.a = torch.zeros(cols, members, in_features, dtype=dtype, device=device)
        self.bt = torch.zeros(cols, sum(out_features), dtype=dtype, device=device)
        self.offsets = [sum(out_features[:m]) for m in range(members + 1)]
        self._x: torch.Tensor | None = None
        self._h: torch.Tensor | None = None  # (M, ..., cols)
        selection.groups.append(self)

    def member_a(self, m: int) -> torch.Tensor:
        """Member m's A (cols, in): a view into the shared buffer."""
        return self.a[:, m]

    def member_bt(self, m: int) -> torch.Tensor:
        """Member m's scaled B^T (cols, out): a view into the shared buffer."""
        return self.bt[:, self.offsets[m] : self.offsets[m + 1]]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's unmasked x A^T in one matmul: an (M, ..., cols in use) view."""
        c, n = self.selection.cols, self.members
        flat = x.reshape(-1, x.shape[-1]).to(self.a.dtype)  # (N, in)
        h = torch.matmul(flat, self.a[:c].reshape(c * n, -1).T)  # (N, c*M), column-major
        return h.view(*x.shape[:-1], c, n).movedim(-1, 0)

    def shrink(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """Member m's (x A_m^T) * mask, (..., cols in use)."""
        if x is not self._x or self._h is None:
            h = self.project(x)
            out = torch.empty(h.shape, dtype=h.dtype, device=h.device)  # member-major
            self._h = torch.mul(h, self.selection.mask, out=out)
            self._x = x
        return self._h[m]

    def forget(self) -> None:
        """Drop the cached input and projections (end of a forward)."""
        self._x = self._h = None


class SlotStack:
    """Gathered adapter weights of one LoRALinear (installed as its `gathered`)."""

    def __init__(self, layer: LoRALinear, selection: Selection, dtype: torch.dtype,
                 shared: tuple[SharedShrink, int] | None = None) -> None:  # fmt: skip
        cols = selection.max_loras * selection.max_rank
        dev = layer.device
        self.selection, self.shared = selection, shared
        if shared is None:
            self.a = torch.zeros(cols, layer.in_features, dtype=dtype, device=dev)  # (cols, in)
            self.bt = torch.zeros(cols, layer.out_features, dtype=dtype, device=dev)  # (cols, out)
        else:
            self.a = shared[0].member_a(shared[1])
            self.bt = shared[0].member_bt(shared[1])

    @property
    def running(self) -> bool:
        """Whether this layer should add gathered deltas now (LoRALinear.forward asks)."""
        return self.selection.running

    def forward(self, x: torch.Tensor, layer: LoRALinear) -> torch.Tensor:
        """The layer's output with each row's delta (LoRALinear.forward hands over to this)."""
        sel = self.selection
        if sel.gemv and _one_row_gemv(x, layer):
            return self.one_row(x, x.reshape(1, -1), layer).view(*x.shape[:-1], -1)
        return self.add_delta(x, layer.base_forward(x))

    def one_row(self, x: torch.Tensor, x2: torch.Tensor, layer: LoRALinear, glu: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The layer at one row through kernels/gemv.py: (1, out), plus `residual` (1, out)
        if given. x2 is the (1, in) input (glu: (1, 2 in), [gate | up], the input
        silu(gate) * up; not for a shared shrink)."""
        sel = self.selection
        h = bt = mask = start = None
        if sel.mask is not None and self.shared is not None:
            if glu:
                raise ValueError("a shared shrink reads the members' common input, not a GLU")
            h, bt = self.shrink(x).reshape(1, -1), self.bt[: sel.cols]
        elif sel.mask is not None:  # unmasked x A^T as partial sums (one kernel)
            if sel.col0 is not None:  # the row's own slot only, chosen on the device
                a, bt, start, rows = self.a, self.bt, sel.col0, (sel.col0, 1, sel.max_rank)
            else:  # every loaded slot; the GEMV applies the row's mask
                a, bt, rows = self.a[: sel.cols], self.bt[: sel.cols], None
                mask = sel.mask.reshape(-1)[: sel.cols]
            if glu and a.dtype == x2.dtype:  # the shrink stores silu(gate) * up too
                x_in = torch.empty(1, a.shape[1], dtype=x2.dtype, device=x2.device)
                h = shrink_triton(x2, a, glu=True, glu_out=x_in, rows=rows)[:, None]
                x2, glu = x_in, False
            else:
                h = shrink_triton(x2.to(a.dtype), a, glu, rows=rows)[:, None]
        return gemv_lora_triton(x2, layer.weight, h, bt, mask, glu=glu, residual=residual,
                                bt_start=start)  # fmt: skip

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's (x A^T) kept in its own adapter's columns: (B, T, cols in use)."""
        if self.shared is not None:
            return self.shared[0].shrink(x, self.shared[1])
        sel = self.selection
        return torch.matmul(x.to(self.a.dtype), self.a[: sel.cols].T).mul_(sel.mask)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + each row's adapter delta; x (B, T, in), y (B, T, out)."""
        sel = self.selection
        if sel.mask is None:
            return y
        c = sel.cols
        h = self.shrink(x)  # (B, T, cols)
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


def one_row_linear(
    layer: nn.Module, x: torch.Tensor, glu: bool = False
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """For an input like x (one row): the function (input (1, in), or with `glu` [gate | up]
    (1, 2 in) whose silu(gate) * up is the input; residual (1, out) or None) ->
    layer(input) [+ residual], as one GEMV (plus its LoRA shrink) with the SwiGLU folded into
    the kernels' input loads and the residual into the GEMV's epilogue. None where the layer
    is not a plain weight or a LoRA layer on its own gathered adapters (then nothing has
    been computed yet)."""
    if isinstance(layer, LoRALinear):
        if not _one_row_gemv(x, layer):
            return None
        stack = layer.gathered
        if stack is not None and stack.running and stack.shared is None:
            return lambda inp, res: stack.one_row(inp, inp, layer, glu=glu, residual=res)
        if stack is None and not layer.lora_A:
            return lambda inp, res: gemv_lora_triton(inp, layer.weight, glu=glu, residual=res)
        return None
    w = getattr(layer, "weight", None)
    if type(layer) is not nn.Linear or layer.bias is not None or w.dtype != x.dtype:
        return None
    return lambda inp, res: gemv_lora_triton(inp, w, glu=glu, residual=res)


def _one_row_gemv(x: torch.Tensor, layer: LoRALinear) -> bool:
    """Whether the fused one-row kernel computes this layer: one token, a plain weight."""
    w = layer.weight
    return (
        x.shape[:-1].numel() == 1
        and w is not None
        and layer.nf4 is None
        and layer.int8 is None
        and layer.bias is None
        and w.dtype == x.dtype
        and triton_available()
        and (x.is_cuda or interpreting())
    )


class AdapterStacks:
    """Every stacked layer of a model and the slot each adapter name occupies."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype) -> None:
        if max_loras < 0 or max_rank < 1:
            raise ValueError(f"max_loras must be >= 0 and max_rank >= 1 ({max_loras}, {max_rank})")
        self.model, self.dtype = model, dtype
        self.selection = Selection(max_loras, max_rank)
        self.stacks: dict[str, SlotStack] = {}
        self.slots: dict[str, int] = {}
        # "<parent>:<first name>" -> shared shrink and its member names (None: no group)
        self._groups: dict[str, tuple[SharedShrink, list[str]] | None] = {}

    def _stack(self, module_name: str, layer: LoRALinear) -> SlotStack:
        stack = self.stacks.get(module_name)
        if stack is None:
            shared = self._shared(module_name)
            stack = SlotStack(layer, self.selection, self.dtype, shared)
            self.stacks[module_name] = stack
            for name, slot in self.slots.items():  # a layer new to the stacks: copy old ones
                stack.write(slot, layer, name)
            layer.gathered = stack
        return stack

    def _shared(self, module_name: str) -> tuple[SharedShrink, int] | None:
        """The shared shrink of a layer with LoRA siblings on the same input, and its index.

        Formed when the first of them is stacked, from the LoRA layers the model has then; a
        sibling that appears later (an adapter with more targets) is stacked alone.
        """
        parent, _, leaf = module_name.rpartition(".")
        names = next((g for g in SHARED_INPUT if leaf in g), ())
        if not names:
            return None
        key = f"{parent}:{names[0]}"
        if key not in self._groups:
            layers = dict(lora_modules(self.model))
            members = [n for n in names if f"{parent}.{n}" in layers]
            sizes = {layers[f"{parent}.{n}"].in_features for n in members}
            self._groups[key] = None
            if len(members) >= 2 and len(sizes) == 1:
                first = layers[f"{parent}.{members[0]}"]
                outs = [layers[f"{parent}.{n}"].out_features for n in members]
                group = SharedShrink(outs, first.in_features, self.selection,
                                     self.dtype, first.device)  # fmt: skip
                self._groups[key] = (group, members)
        entry = self._groups[key]
        if entry is None or leaf not in entry[1]:
            return None
        return entry[0], entry[1].index(leaf)

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
        self._groups.clear()
        self.selection.groups.clear()
