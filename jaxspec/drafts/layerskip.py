"""Self-speculation draft: the target's first k layers, its final norm and its output layer."""

from __future__ import annotations

import dataclasses

from jaxspec.errors import UserError


def layerskip(target, num_layers: int):
    """A draft model sharing the target's arrays (no copy) but running only num_layers layers."""
    if not 1 <= num_layers < target.config.num_layers:
        raise UserError(f"draft 'layerskip:{num_layers}': K must be in 1.."
                        f"{target.config.num_layers - 1} (fewer than the target's "
                        f"{target.config.num_layers} layers)")
    config = dataclasses.replace(target.config, num_layers=num_layers)
    params = {**target.params, "layers": target.params["layers"][:num_layers]}
    return dataclasses.replace(target, config=config, params=params)
