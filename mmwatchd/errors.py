"""The one error hierarchy of mmwatchd.

    MmwatchdError                 anything mmwatchd reports to a person
    ├── ConfigError               the YAML is wrong: every problem, with file:line and key path
    ├── MediaError                this file cannot be sent (permanent for this file version)
    │   ├── UnsupportedMedia      not an image/video we can read ("looks like text", "empty file")
    │   ├── DecodeError           looks like media but does not decode (truncated, corrupt)
    │   ├── MediaTooLarge         over a pixel/size limit (decompression bombs)
    │   └── BudgetExceeded        cannot be made to fit endpoint.max_request_bytes
    ├── VLMError                  the model call failed
    │   ├── VLMUnavailable        transient: connection, timeout, 408/409/429, 5xx (retry later)
    │   │   └── VLMMisconfigured  the endpoint refuses everyone: bad key, unknown model or URL (fix, then retry)
    │   ├── VLMRejected           permanent: the server refused this request (4xx)
    │   └── VLMBadReply           the reply was unusable (invalid JSON after a retry)
    ├── SidecarError              the sidecar cannot be written
    │   ├── ForeignSidecar        a file we did not write sits at the sidecar path
    │   └── XMPError              the XMP sidecar cannot be read or written (the JSON sidecar still is)
    │       └── XMPRefused        the XMP file there is hostile or not XMP: left untouched, never expanded
    └── StateError                the state database cannot be opened or written

Messages say what is wrong, with which file, and what to do. They never contain payloads or secrets.
Every class has a short ``kind`` that sidecars and logs record.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


class MmwatchdError(Exception):
    """An error a person can act on; its message is shown as is, without a traceback."""

    kind = "error"
    #: Transient errors leave no sidecar and are retried later.
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(MmwatchdError):
    """One or more problems in a config file; ``problems`` holds one line per problem."""

    kind = "config"

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class MediaError(MmwatchdError):
    kind = "media"


class UnsupportedMedia(MediaError):
    kind = "unsupported"


class DecodeError(MediaError):
    kind = "decode"


class MediaTooLarge(MediaError):
    kind = "too_large"


class BudgetExceeded(MediaError):
    kind = "budget"


class VLMError(MmwatchdError):
    kind = "vlm"


class VLMUnavailable(VLMError):
    kind = "unavailable"
    retryable = True
    #: Seconds the server asked us to wait (Retry-After), when it said.
    retry_after: float | None = None
    #: The HTTP status when the server answered; None when it did not (refused, timed out).
    status: int | None = None

    @property
    def counts_against_file(self) -> bool:
        """The server answered this request with a failure (408/409/5xx): the file itself may be the cause.

        An unreachable endpoint or a 429 says nothing about the file and never uses up its attempts.
        """
        return self.status is not None and self.status != 429


class VLMMisconfigured(VLMUnavailable):
    """Not the file's fault: every request would fail the same way until the config, key or server is fixed.

    Files are therefore not marked failed; work waits, and the log says what to fix.
    """

    kind = "endpoint_config"

    @property
    def counts_against_file(self) -> bool:
        return False


class VLMRejected(VLMError):
    kind = "rejected"
    #: The HTTP status and the server's own words, when the server answered (``video.mode: auto`` reads them).
    status: int | None = None
    server_message: str = ""


class VLMBadReply(VLMError):
    kind = "bad_reply"


class SidecarError(MmwatchdError):
    kind = "sidecar"
    retryable = True


class ForeignSidecar(SidecarError):
    kind = "foreign_sidecar"
    retryable = False


class XMPError(SidecarError):
    """The XMP sidecar for photo apps could not be written (disk full, read-only folder): worth another try."""

    kind = "xmp"


class XMPRefused(XMPError):
    """The file at the XMP path is not one we will touch: a DOCTYPE or entities (XXE, expansion bombs), over the
    size cap, not XML, or not XMP. It is left as it is; the JSON sidecar is still the record."""

    kind = "xmp_refused"
    retryable = False


class StateError(MmwatchdError):
    """The state database cannot be opened or written (permissions, disk full)."""

    kind = "state"


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, with an ellipsis where it was cut: a message stays a message
    whatever a server or a file system said into it."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def safe_url(url: str) -> str:
    """A base URL as messages (and keys kept in the state database) show it: without user:password or query."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
