"""Keep the terminal for our own progress and errors: the libraries' warnings that are not a user's concern
(transformers on a missing torchvision, diffusers on a LoRA without text-encoder keys, peft on a second LoRA) stay
out of it."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Without importing diffusers or transformers (seconds, and `--help` or a bad flag must answer at once):
    both read their log level from these variables when they are first imported, here or in a local Ray's
    workers, which inherit the environment. A worker on a remote node inherits nothing: it calls this too."""
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    # peft, on every second LoRA loaded beside a first: what `generate --mode direct` and the benchmark mean to do
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model")
    for library in ("diffusers", "transformers"):
        os.environ.setdefault(f"{library.upper()}_VERBOSITY", "error")
        if library in sys.modules:  # already imported (the tests, a caller of main(), a worker): set it directly
            logging.getLogger(library).setLevel(logging.ERROR)
