"""The error tree of vstream.

One base, ``VStreamError``, and a subclass per stage of the path. Each subclass also
derives from the nearest builtin, so ``except OSError`` around a source still works.
Messages name the input and what was expected.
"""


class VStreamError(Exception):
    """Base of every error vstream raises on purpose."""


class ConfigError(VStreamError, ValueError):
    """A configuration value is out of range or of the wrong kind."""


class SourceError(VStreamError, OSError):
    """A source cannot be opened or read: missing file, unreachable URL, no camera,
    a connection lost for good."""


class DecodeError(VStreamError, ValueError):
    """A source opened but its bytes are not media vstream can decode: not a media
    file, a truncated or corrupt file, no video and no audio stream."""


class KernelError(VStreamError, ValueError):
    """A kernel was given tensors it cannot handle: wrong rank, mismatched shapes, an
    unsupported dtype or device. Raised by the wrapper before anything launches."""


class MemoryStateError(VStreamError, ValueError):
    """A memory cannot take the input it was given, or a saved memory cannot be loaded:
    missing, damaged, truncated, or written by an incompatible format version."""


class EncoderError(VStreamError, ValueError):
    """An encoder cannot be built or cannot encode its input: unknown or unsupported
    model, missing weights, images or audio of the wrong kind."""


class ModelLoadError(VStreamError, OSError):
    """A model cannot be loaded: no such hub id or folder, no network to fetch it, an
    architecture vstream has no adapter for, or files that do not match their config."""


class ProtocolError(VStreamError, ValueError):
    """A message on the wire is malformed or refused: wrong parts, a header that is not
    a JSON object, an unknown kind, a field of the wrong type, an array whose shape does
    not match its bytes, a size over a limit, a wrong token.

    Attributes:
        code: which fault, one of ``vstream.protocol.ERROR_CODES`` (sent back to the peer).
        request_id: the id of the request it answers, when the header could be read that far.
    """

    def __init__(self, message: str, code: str = "bad_message", request_id: int | None = None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id


class ServerError(VStreamError, RuntimeError):
    """The server answered a request with an error.

    Attributes:
        code: the error code (``vstream.protocol.ERROR_CODES``).
        retry_after: seconds to wait before sending again (rate limit), or None.
    """

    def __init__(self, message: str, code: str, retry_after: float | None = None):
        super().__init__(message)
        self.code, self.retry_after = code, retry_after


class ServerBusy(ServerError):
    """The server's work queue was full: the question was not taken; ask again later."""


class ServerTimeout(ServerError, TimeoutError):
    """No reply within the client's timeout: the server is down, unreachable, or
    refused the connection (a CURVE key it does not know)."""


class JudgeError(VStreamError, OSError):
    """A judge server (``vstream eval --judge-endpoint``) could not be reached or
    answered with something that is not a chat completion, after its retries."""


class DataError(VStreamError, ValueError):
    """A training or evaluation data file that cannot be read as its format says: the
    message names the file, the record and the field."""
