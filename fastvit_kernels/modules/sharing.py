"""What the ``from_module`` builders share: a fused module built around an existing one's parameters
takes that module's train/eval mode."""

from __future__ import annotations

from typing import TypeVar

import torch.nn as nn

M = TypeVar("M", bound=nn.Module)


def take_mode(fused: M, original: nn.Module) -> M:
    """Gives the modules ``fused`` created the mode of ``original`` and returns ``fused``.

    A builder makes its new modules with ``nn.Module.__init__`` (training mode), so without this a
    block built from an eval model would run its training path. The submodules it shares with
    ``original`` keep their own mode (e.g. a BatchNorm frozen in eval inside a training model).
    """
    shared = {id(m) for m in original.modules()}
    for m in fused.modules():
        if id(m) not in shared:
            m.training = original.training
    return fused
