"""UnZipLoRA: decompose ONE stylized image into a content LoRA and a style LoRA for SDXL."""

from .config import FitConfig, Prompts
from .errors import BaseModelError, FitDivergedError, InputError, UnZipLoRAError
from .export import FitArtifacts, load_fit
from .fit import FitResult, fit
from .models import BaseModel, load_base_model

__all__ = [
    "BaseModel", "BaseModelError", "FitArtifacts", "FitConfig", "FitDivergedError", "FitResult", "InputError",
    "Prompts", "UnZipLoRAError", "fit", "load_base_model", "load_fit",
]
