"""One exception family for the whole toolkit."""

from __future__ import annotations


class GGUFLabError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class GGUFFormatError(GGUFLabError, ValueError):
    """A GGUF file is malformed: the message names the file, the tensor and the value."""

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if tensor is not None:
            parts.append(f"tensor {tensor!r}")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path = path
        self.tensor = tensor


class ModelNotFoundError(GGUFLabError, FileNotFoundError):
    """The model file does not exist (also a ``FileNotFoundError``)."""


class TensorNotFoundError(GGUFLabError, KeyError):
    """A tensor name that the model does not have (also a ``KeyError``); the message names the
    file and the closest names it does have."""

    def __str__(self) -> str:  # a KeyError would show its message quoted
        return str(self.args[0]) if self.args else ""


class MetadataNotFoundError(GGUFLabError, KeyError):
    """A metadata key that the model does not have (also a ``KeyError``); the message names the
    file and the closest keys it does have."""

    __str__ = TensorNotFoundError.__str__


def not_found(cls: type, path, what: str, name, known) -> GGUFLabError:
    """``cls`` (``TensorNotFoundError`` or ``MetadataNotFoundError``) for ``name``, naming the file
    and up to three of the ``known`` names closest to it."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return cls(f"{path}: no {what} {name!r}{hint}")


class OutputExistsError(GGUFLabError, FileExistsError):
    """An output path holds a file the toolkit was not asked to replace (also a
    ``FileExistsError``); see ``gguf_gpu_lab.outputs``."""


class UnsupportedTypeError(GGUFLabError, NotImplementedError):
    """A GGML tensor type this toolkit cannot dequantize."""


class DeviceMemoryError(GGUFLabError, MemoryError):
    """The GPU ran out of memory; the message names the bytes needed and free."""


class LoadCancelled(GGUFLabError):
    """A load was cancelled by the caller (progress callback, cancel(), or KeyboardInterrupt)."""


class BackendError(GGUFLabError, RuntimeError):
    """The requested backend (for example a GPU through CuPy) is not usable here."""


class SourceChangedError(GGUFLabError):
    """A model's file changed after it was opened (truncated, rewritten or appended to in place):
    its bytes may no longer be those its header describes. A file replaced on disk (a new inode)
    is not an error: the open model keeps reading the file it opened."""

    def __init__(self, name: str, detail: str):
        super().__init__(f"{name}: the file changed after it was opened: {detail}; open it again")
        self.path = name


class RemoteError(GGUFLabError):
    """A remote file could not be read: access denied (401/403, a gated repository), not found
    (404), a server that ignores ``Range``, or a connection that kept failing after its retries.
    The message names the URL without its credentials."""


class RemoteNotFoundError(RemoteError, ModelNotFoundError):
    """A remote file that does not exist (HTTP 404; also a ``ModelNotFoundError``)."""


class RemoteWarning(UserWarning):
    """A remote file can be read, with less protection than usual: its server gives no version
    (neither an ETag nor a Last-Modified date), so it is neither cached nor shared."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the caller's own line: the first frame outside this
    package (a notebook cell, a script), however deep in the toolkit the warning is raised."""
    import os
    import sys
    import warnings

    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 2, sys._getframe(1)  # 1: this function; 2: its caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
