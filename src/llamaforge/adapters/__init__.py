"""Parameter-efficient fine-tuning: LoRA adapters, NF4 base weights, and their injection."""

from .inject import (
    DEFAULT_TARGETS,
    add_adapter,
    apply_freeze,
    apply_lora,
    lora_state_dict,
    merge_lora,
    parameter_counts,
    quantize_linears,
    trainable_parameters,
    unload_lora,
)
from .lora import (
    LoRALinear,
    adapter_names,
    clear_row_adapters,
    disable_adapters,
    lora_modules,
    row_adapters,
    set_adapter,
    set_row_adapters,
)
from .nf4 import NF4Linear, NF4Tensor, NF4Weight, dequantize_nf4, quantize_nf4

__all__ = [
    "DEFAULT_TARGETS",
    "LoRALinear",
    "NF4Linear",
    "NF4Tensor",
    "NF4Weight",
    "add_adapter",
    "adapter_names",
    "apply_freeze",
    "apply_lora",
    "clear_row_adapters",
    "dequantize_nf4",
    "disable_adapters",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "parameter_counts",
    "quantize_linears",
    "quantize_nf4",
    "row_adapters",
    "set_adapter",
    "set_row_adapters",
    "trainable_parameters",
    "unload_lora",
]
