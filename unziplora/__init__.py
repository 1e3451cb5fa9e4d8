"""UnZipLoRA: decompose ONE stylized image into a content LoRA and a style LoRA for SDXL.

Names are imported on first use, so light modules (`unziplora.config`, `unziplora.errors`) load without
torch and diffusers - Ray Data tasks that only hash images and check settings start in well under a second.
"""

from importlib import import_module

_EXPORTS = {
    "FitConfig": "config", "Prompts": "config",
    "BaseModelError": "errors", "FitDivergedError": "errors", "InputError": "errors", "UnZipLoRAError": "errors",
    "FitArtifacts": "export", "load_fit": "export",
    "FitResult": "training", "fit": "training", "fit_many": "training",
    "BaseModel": "models", "load_base_model": "models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
