"""The exceptions lens-jax raises on purpose: each names the problem and the fix in one message.

    LensError
    ├── CheckpointError          a checkpoint is missing, malformed, truncated, pickled or mismatched
    │   ├── CheckpointNotFoundError   no such folder, file or hub repository
    │   ├── LayoutError               tensor names of no known layout
    │   └── ConvertedCheckpointError  a conversion output is incomplete or contradicts its manifest
    ├── InputError               a bad argument of the API, the CLI or the service (also a ValueError)
    ├── ReasonerError            the prompt reasoner's HTTP endpoint failed (a RuntimeError)
    └── ConvertError             a bad command line or destination of the conversion tool

Everything here derives from `ValueError` as well (except where a more specific builtin fits),
so code written against the builtin exceptions keeps working.
"""

from __future__ import annotations


class LensError(Exception):
    """Base class of every error lens-jax raises on purpose."""


class CheckpointError(LensError, ValueError):
    """A checkpoint is missing, malformed, truncated, of an unsupported format or mismatched."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint folder, file or hub repository could not be found or is incomplete."""


class LayoutError(CheckpointError):
    """A checkpoint's tensor names match no known layout of the component."""


class ConvertedCheckpointError(CheckpointError):
    """A conversion output is incomplete or does not match its own configs / manifest."""


class InputError(LensError, ValueError):
    """A bad argument: the message names it and says what is accepted."""


class ConvertError(LensError, ValueError):
    """A user-facing problem with the conversion command line or its destination."""


class ReasonerError(LensError, RuntimeError):
    """The prompt reasoner's HTTP endpoint failed (timeout, HTTP error, malformed reply)."""
