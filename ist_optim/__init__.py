"""ist-optim: Importance-aware Sparse Tuning (Yao et al. 2024, arXiv 2410.11772) as a drop-in optimizer.

from ist_optim import ISTAdamW
opt = ISTAdamW(peft_model, lr=2e-4)   # instead of torch.optim.AdamW(...)
"""

from .adapters import ParallelAdapter, SeriesAdapter, add_adapters
from .diagnostics import ImportanceReport
from .fused_lora import fuse_lora
from .integrations import ISTAdamWFactory
from .layers import LayerMap, discover_layers
from .optimizer import IST, ISTAdamW
from .policies import (
    CKALayers,
    FixedLayers,
    GradNormLayers,
    LayerPolicy,
    LayerwiseCKA,
    LISALayers,
    PolicyContext,
    SafeImportance,
    SpreadLayers,
    WeightedLayers,
    outlier_ratios,
)
from .scheduler import ImportanceScheduler
from .suppression import find_adapter_modules, suppress

__all__ = [
    "CKALayers",
    "FixedLayers",
    "GradNormLayers",
    "LayerwiseCKA",
    "LISALayers",
    "PolicyContext",
    "SafeImportance",
    "SpreadLayers",
    "WeightedLayers",
    "outlier_ratios",
    "LayerPolicy",
    "IST",
    "ISTAdamW",
    "ISTAdamWFactory",
    "ImportanceReport",
    "ImportanceScheduler",
    "LayerMap",
    "ParallelAdapter",
    "SeriesAdapter",
    "add_adapters",
    "discover_layers",
    "find_adapter_modules",
    "fuse_lora",
    "suppress",
]
__version__ = "0.1.0"
