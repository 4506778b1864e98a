"""The built-in adapter methods: importing this module registers every one (torch-free).

Each family's `configs.py` defines its methods' recipe configs and registers them with
`peftune.adapters.registry`; this is the one module that imports them all, once.
`peftune.adapters` imports it, so the registry is complete whenever it can be reached.
Implementations live beside each family's configs (`model.py`, ...) and are imported only
when a model is built. Adding a method: docs/adding_a_method.md.
"""

from __future__ import annotations

from peftune.adapters.bottleneck import configs as bottleneck  # noqa: F401
from peftune.adapters.full import configs as full  # noqa: F401
from peftune.adapters.full.configs import FreezeConfig, FullConfig
from peftune.adapters.lora import configs as lora  # noqa: F401
from peftune.adapters.lora.configs import LoraConfig
from peftune.adapters.lowrank import budget_configs as lowrank_budget  # noqa: F401
from peftune.adapters.lowrank import configs as lowrank  # noqa: F401
from peftune.adapters.mola import configs as mola  # noqa: F401
from peftune.adapters.prompt import configs as prompt  # noqa: F401
from peftune.adapters.sparse import configs as sparse  # noqa: F401
from peftune.adapters.tuners import configs as tuners  # noqa: F401
from peftune.adapters.tuners import product_configs as tuner_products  # noqa: F401

__all__ = ["FreezeConfig", "FullConfig", "LoraConfig"]
