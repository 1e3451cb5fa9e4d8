"""The errors this package raises on purpose; anything else is a bug."""


class UnZipLoRAError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(UnZipLoRAError, ValueError):
    """Bad user input: an image, a prompt, a path or a setting."""


class FitDivergedError(UnZipLoRAError, RuntimeError):
    """The loss became NaN or infinite; carries the step."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}; lower the learning rate or use fp32/bf16")
        self.step, self.loss = step, loss


class BaseModelError(UnZipLoRAError, ValueError):
    """A base model that cannot be used (not an SDXL pipeline, missing files)."""
