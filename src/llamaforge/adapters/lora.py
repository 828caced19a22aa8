"""LoRA: low-rank adapters beside a frozen linear layer (plain, NF4 or int8), several per layer.

y = x @ W^T + dropout(x) @ A^T @ B^T * scaling, with A (r, in), B (out, r) zero-initialised
so a fresh adapter leaves the model unchanged, and scaling = alpha / r (alpha / sqrt(r)
with rsLoRA). A layer holds any number of named adapters; one is active, or, for batched
serving, each batch row names its own (or none). `disable_adapters` turns them all off,
which gives the base model back, e.g. as the DPO/PPO reference. Over a quantised base
(NF4 from QLoRA or `llamaforge quantize --bits 4`, int8 from `--bits 8`) the base forward
dequantises and the adapters are float32 unless given a dtype; their delta is added in the
output's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..kernels import Kernels
from .fused import fused_lora_group, fused_lora_linear
from .int8 import Int8Linear
from .nf4 import NF4Linear, NF4Weight, linear_add, nf4_linear, plain_linear


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def fusable_device(x: torch.Tensor) -> bool:
    """Whether the fused LoRA layer runs for this input by default: on CUDA (CPU runs keep
    the unfused reference; tests call the fused path on the CPU directly)."""
    return x.is_cuda


class LoRALinear(nn.Module):
    """A frozen linear layer (`weight` (out, in), or `nf4` / `int8` when quantised) plus named
    adapters.

    Parameters: `lora_A[name]` (r, in), `lora_B[name]` (out, r). Set `active` to choose the
    adapter, `disabled` to run the base alone, or `set_rows` for one adapter per batch row.
    """

    def __init__(self, base: nn.Linear | NF4Linear | Int8Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.compute_dtype: torch.dtype | None = None
        self.int8: Int8Linear | None = None
        if isinstance(base, Int8Linear):  # the layer itself: it dequantises in its forward
            self.register_parameter("weight", None)
            self.nf4 = None
            self.int8 = base
        elif isinstance(base, NF4Linear):
            self.register_parameter("weight", None)
            self.nf4: NF4Weight | None = base.nf4
            self.compute_dtype = base.compute_dtype
        else:
            self.weight = base.weight
            self.weight.requires_grad_(False)
            self.nf4 = None
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.disabled = False
        self._rows: list[tuple[str, torch.Tensor]] | None = None  # (adapter, row indices)
        self._batch = 0
        # Serving: an object whose `forward(x, layer)` is the output with each row's own
        # adapter delta from gathered weights (serve.lora_stack) while it runs a batch.
        self.gathered = None
        self.kernels = Kernels()  # set by Llama.set_kernels; `lora` (default) picks the fused layer

    @property
    def device(self) -> torch.device:
        """Device of the base weight."""
        if self.int8 is not None:
            return self.int8.qweight.device
        return self.weight.device if self.nf4 is None else self.nf4.packed.device

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Add adapter `name`: A Kaiming-uniform (as nn.Linear and PEFT), B zeros."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        if dtype is None:
            dtype = torch.float32 if self.weight is None else self.weight.dtype
        a = torch.empty(r, self.in_features, device=self.device, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)  # (r, in)
        self.lora_B[name] = nn.Parameter(a.new_zeros(self.out_features, r))  # (out, r)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank[name], self.alpha[name], self.rslora[name] = r, float(alpha), rslora
        self.scaling[name] = lora_scaling(r, alpha, rslora)
        if self.active is None:
            self.active = name

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name` from this layer (the active one falls back to None)."""
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this layer (has {list(self.lora_A)})")
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        for table in (self.rank, self.alpha, self.rslora, self.scaling):
            table.pop(name)
        if self.active == name:
            self.active = None

    def quantize_(
        self,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        """Store the frozen base weight as NF4 from now on (adapters are kept)."""
        if self.int8 is not None:
            raise Int8BaseError("re-quantised to NF4 (QLoRA)")
        if self.nf4 is None:
            self.nf4 = NF4Weight.from_float(self.weight.detach(), blocksize, double_quant)
            self.weight = None
        self.compute_dtype = compute_dtype

    def dropout_p(self, name: str) -> float:
        """Dropout probability of adapter `name`."""
        drop = self.lora_dropout[name]
        return drop.p if isinstance(drop, nn.Dropout) else 0.0

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen layer alone: (..., in) -> (..., out)."""
        if self.int8 is not None:
            return self.int8(x)
        if self.nf4 is not None:
            return nf4_linear(x, self.nf4, self.bias, self.compute_dtype)
        return F.linear(x, self.weight, self.bias)

    def adapter_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """dropout(x) @ A^T @ B^T * scaling for one adapter: (..., in) -> (..., out)."""
        a, b = self.lora_A[name], self.lora_B[name]
        # Under autocast the matmuls run in its dtype anyway: casting x up first would only
        # copy the activations twice.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        h = F.linear(self.lora_dropout[name](x), a)  # (..., r)
        scaling = self.scaling[name]
        if scaling != 1.0:  # scale the r-wide projection, not the (..., out) delta: one
            h = h * scaling  # pass over r columns instead of out (none at all when alpha = r)
        return F.linear(h, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        gathered = self.gathered
        if gathered is not None and gathered.running:  # an engine forward (serve/lora_stack)
            return gathered.forward(x, self)
        dtype = self._fused_dtype(x)
        if dtype is not None:
            return self._fused_forward(x, dtype)
        if self.disabled or not self.lora_A:
            return self.base_forward(x)
        if self._rows is not None:
            return self._row_forward(x, self.base_forward(x))
        if self.active is None or self.active not in self.lora_A:
            return self.base_forward(x)
        # The delta first, the frozen base matmul last: a block's last projection is then
        # the last op of the block that saves a tensor for the backward, and activation
        # checkpointing's recompute (which stops once every saved tensor is back) never
        # runs it: its output is not needed to differentiate anything. The base matmul
        # adds the delta itself (`base_plus`: no separate pass, no third (..., out) tensor).
        return self.base_plus(x, self.adapter_delta(x, self.active))

    def base_plus(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Frozen layer plus a delta of its output's shape, the add done by the base matmul
        (`addmm`: cuBLAS reads the delta in its epilogue, beta = 1) instead of a separate
        full-width pass; autograd saves only the frozen weight, as for `F.linear`. A bias or
        an int8 base adds the delta afterwards."""
        if self.int8 is not None or self.bias is not None:
            y = self.base_forward(x)
            return delta.to(y.dtype).add_(y)
        if self.nf4 is not None:
            return nf4_linear(x, self.nf4, None, self.compute_dtype, add=delta)
        if not torch.is_autocast_enabled(x.device.type):  # addmm wants one dtype
            delta = delta.to(self.weight.dtype)
        return linear_add(x, self.weight, delta)

    def _fused_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The compute dtype of the fused layer (adapters/fused.py) for this input, or None
        where the unfused path runs: the kernel off or off CUDA, an int8 base, per-row or no
        adapters, or dtypes that only the unfused path's casts reconcile."""
        name = self.active
        if not (self.kernels.lora and fusable_device(x)) or self.int8 is not None or self.disabled:
            return None
        if self._rows is not None or name is None or name not in self.lora_A:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        dtype = x.dtype if self.nf4 is None else (self.compute_dtype or x.dtype)
        same = self.lora_A[name].dtype == dtype and (
            self.nf4 is not None or self.weight.dtype == dtype
        )
        return dtype if same and x.dtype == dtype else None

    def _fused_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The active adapter's layer as one autograd node (base + delta, one rounding)."""
        name = self.active
        x_drop = self.lora_dropout[name](x)
        y = fused_lora_linear(
            x,
            self.weight if self.nf4 is None else self.nf4,
            self.bias,
            self.lora_A[name],
            self.lora_B[name],
            self.scaling[name],
            dtype,
            None if x_drop is x else x_drop,
        )
        # an NF4 base returns x's dtype (as nf4_linear), a plain one the compute dtype
        return y if self.nf4 is None else y.to(x.dtype)

    @staticmethod
    def group_forward(
        x: torch.Tensor, layers: Sequence[nn.Module]
    ) -> tuple[torch.Tensor, ...] | None:
        """Layers that read the same x (q/k/v, gate/up) as one fused node
        (adapters/fused.py `fused_lora_group`), or None where they must run on their own:
        any layer that would not take the fused path alone, a bias, LoRA dropout while
        training, or adapters that differ in name, scaling or kind of base."""
        first = layers[0]
        if len(layers) < 2 or not all(isinstance(m, LoRALinear) for m in layers):
            return None
        dtype, name = first._fused_dtype(x), first.active
        if dtype is None or (first.gathered is not None and first.gathered.running):
            return None
        for m in layers:
            if m._fused_dtype(x) != dtype or m.active != name or m.bias is not None:
                return None
            if m.scaling[name] != first.scaling[name] or (m.nf4 is None) != (first.nf4 is None):
                return None
            if m.training and m.dropout_p(name) > 0:  # each layer's own mask: not shared
                return None
        ys = fused_lora_group(
            x,
            [m.weight if m.nf4 is None else m.nf4 for m in layers],
            [m.lora_A[name] for m in layers],
            [m.lora_B[name] for m in layers],
            first.scaling[name],
            dtype,
        )
        # an NF4 base returns x's dtype (as nf4_linear), a plain one the compute dtype
        return ys if first.nf4 is None else tuple(y.to(x.dtype) for y in ys)

    def _row_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add each adapter's delta to its own rows of the batch (dim 0) only."""
        if x.shape[0] != self._batch:
            raise ValueError(
                f"per-row adapters were set for a batch of {self._batch} rows, got {x.shape[0]}"
            )
        for name, rows in self._rows:
            delta = self.adapter_delta(x.index_select(0, rows), name)  # (n_rows, ..., out)
            y = y.index_add(0, rows, delta.to(y.dtype))
        return y

    def set_rows(self, names: Sequence[str | None]) -> None:
        """Row i of the next batches uses adapter names[i] (None: no adapter)."""
        groups = []
        for name in self.lora_A:
            rows = [i for i, n in enumerate(names) if n == name]
            if rows:
                groups.append((name, torch.tensor(rows, device=self.device)))
        self._rows, self._batch = groups, len(names)

    def clear_rows(self) -> None:
        """Back to the single active adapter."""
        self._rows, self._batch = None, 0

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen weight (out, in), dequantised if NF4/int8 (default dtype: float32 then)."""
        if self.int8 is not None:
            return self.int8.dequantize(dtype or torch.float32)
        if self.nf4 is not None:
            return self.nf4.dequantize(dtype or self.compute_dtype or torch.float32)
        return self.weight if dtype is None else self.weight.to(dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """B @ A * scaling (out, in) of one adapter."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    def merged_weight(self, name: str | None) -> torch.Tensor:
        """W + B @ A * scaling (out, in), summed in float32, in the base's dtype (None: W)."""
        w = self.base_weight()
        if name is None:
            return w.detach().clone()
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this layer (has {list(self.lora_A)})")
        merged = w.float() + self.delta_weight(name).float()
        return merged.to(w.dtype).detach()

    def merge(self, name: str | None = None) -> nn.Linear:
        """Plain nn.Linear with adapter `name` (default: the active one) folded in.

        An NF4 base is dequantised first; with no adapter the result is the base alone.
        """
        return plain_linear(self.merged_weight(name or self.active), self.bias)

    def unmerged(self) -> nn.Linear | NF4Linear | Int8Linear:
        """The frozen base layer alone, without any adapter."""
        if self.int8 is not None:
            return self.int8
        if self.nf4 is not None:
            return NF4Linear(self.nf4, self.bias, self.compute_dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        lin.weight, lin.bias = self.weight, self.bias  # the same frozen tensors, not copies
        return lin

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={self.rank[n]})" for n in self.lora_A)
        quant = ", nf4" if self.nf4 is not None else ", int8" if self.int8 is not None else ""
        return f"in={self.in_features}, out={self.out_features}{quant}, adapters=[{adapters}]"


class Int8BaseError(UserError):
    """An int8-quantised base asked to do what only a float or NF4 base can."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"an int8-quantised model (llamaforge quantize --bits 8) cannot be {what}: "
            "use the unquantised model"
        )


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) of every LoRALinear in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of all adapters in the model, in the order they were added."""
    names: dict[str, None] = {}
    for _, m in lora_modules(model):
        names.update(dict.fromkeys(m.lora_A))
    return list(names)


def check_adapters(model: nn.Module, names: Sequence[str | None]) -> None:
    """Raise KeyError naming the known adapters if any name (None aside) is unknown."""
    known = adapter_names(model)
    for n in names:
        if n is not None and n not in known:
            raise KeyError(f"no adapter named {n!r} in the model; adapters: {known}")


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter of every LoRA layer (None: no adapter)."""
    check_adapters(model, [name])
    for _, m in lora_modules(model):
        m.active = name


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the frozen base model inside the block (e.g. as the DPO/PPO reference)."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(mods, before, strict=True):
            m.disabled = was


def set_row_adapters(model: nn.Module, names: Sequence[str | None]) -> None:
    """Row i of following batches uses adapter names[i] or none (None), in one forward."""
    check_adapters(model, names)
    for _, m in lora_modules(model):
        m.set_rows(names)


def clear_row_adapters(model: nn.Module) -> None:
    """Forget per-row adapters; the active adapter applies to every row again."""
    for _, m in lora_modules(model):
        m.clear_rows()


@contextmanager
def row_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Per-row adapters inside the block, cleared on exit."""
    set_row_adapters(model, names)
    try:
        yield model
    finally:
        clear_row_adapters(model)
