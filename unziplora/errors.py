"""The errors this package raises on purpose; anything else is a bug."""


def first_line(exc: Exception, limit: int | None = None) -> str:
    """An error in one line (its first, at most `limit` characters), for a message that names its own cause;
    the error's type where it has no text."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class UnZipLoRAError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(UnZipLoRAError, ValueError):
    """Bad user input: an image, a prompt, a path or a setting."""


class FitDivergedError(UnZipLoRAError, RuntimeError):
    """The loss became NaN or infinite; carries the step."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}; lower the learning rate or use fp32/bf16")
        self.step, self.loss = step, loss


class NotChosen(UnZipLoRAError):
    """A candidate fit stopped at a selection mid-training (fit_many's `select`): another was trained on."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}: not chosen to train on")
        self.step = step


class BaseModelError(UnZipLoRAError, ValueError):
    """A base model that cannot be used (not an SDXL pipeline, missing files)."""
