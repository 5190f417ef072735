"""Full models on the fused ops, built by name: ``fastvit_kernels.create_model("mobilevit_s")``.

Every model has the state_dict keys of the timm model of the same name, so weights users already
have load unchanged.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from . import cvnets, edgenext, levit, mobilevit

# name -> builder(**kwargs); one row per model.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    **{name: (lambda config: lambda **kwargs: mobilevit.MobileViT(config, **kwargs))(config)
       for name, config in mobilevit.CONFIGS.items()},
    **{name: (lambda config: lambda **kwargs: edgenext.EdgeNeXt(config, **kwargs))(config)
       for name, config in edgenext.CONFIGS.items()},
    **{name: (lambda config: lambda **kwargs: levit.Levit(config, **kwargs))(config)
       for name, config in levit.CONFIGS.items()},
}

# family -> converter (state_dict, model) from the original authors' checkpoint keys to ours, applied
# when a checkpoint's keys are not already ours.
_CONVERTERS: Dict[str, Callable[[Mapping[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]] = {
    "mobilevit": lambda state, model: cvnets.convert_cvnets_mobilevit(state),
    "edgenext": edgenext.convert_official_edgenext,
    "levit": levit.convert_official_levit,
}


def list_models() -> List[str]:
    return sorted(MODELS)


def create_model(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None,
                 **kwargs) -> nn.Module:
    """Build model ``name``; keyword arguments (``num_classes``, ``drop_rate``, ``drop_path_rate``, ...)
    go to its constructor as in ``timm.create_model``.

    Weights: ``checkpoint_path`` loads a state_dict file with timm's keys or the original authors'
    (converted on the fly); ``pretrained=True`` copies timm's pretrained weights (needs timm and its
    download to work).
    """
    if name not in MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; available: {', '.join(list_models())}")
    model = MODELS[name](**kwargs)
    if pretrained and checkpoint_path:
        raise ValueError("create_model: pass pretrained=True or checkpoint_path, not both")
    if pretrained:
        import timm  # optional dependency, only for its weights

        model.load_state_dict(timm.create_model(name, pretrained=True, **kwargs).state_dict())
    elif checkpoint_path:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(_to_timm_keys(name, state, model))
    return model


def _to_timm_keys(name: str, state: Mapping, model: nn.Module) -> Mapping[str, torch.Tensor]:
    unwrapped = state
    for wrapper in ("state_dict", "model"):
        if isinstance(unwrapped.get(wrapper), Mapping):
            unwrapped = unwrapped[wrapper]
    family = name.split("_")[0]
    if set(unwrapped) <= set(model.state_dict()) or family not in _CONVERTERS:
        return unwrapped
    return _CONVERTERS[family](state, model)


__all__ = ["MODELS", "create_model", "list_models"]
