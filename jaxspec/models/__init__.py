"""Models: config, the pure decoder, the KV cache, the layout policy and the `Model` type.

Nothing here imports from `jaxspec.decode`, `jaxspec.drafts`, `jaxspec.checkpoint` or the CLI.
"""

from jaxspec.models.config import ModelConfig
from jaxspec.models.layout import Layout
from jaxspec.models.loaded import Model

__all__ = ["Layout", "Model", "ModelConfig"]
