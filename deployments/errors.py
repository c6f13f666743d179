"""Typed errors for bad user input.

Stages raise these; the HTTP layer maps `http_status` and `code` to a JSON error, the CLI prints
`message` on one line. Anything else escaping a stage is a bug in motionserve, not in the input.
"""

from __future__ import annotations


class InputError(Exception):
    """The user's input cannot be processed; `message` says why in words a user understands."""

    code = "invalid_input"
    http_status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class EmptyInputError(InputError):
    code = "empty_input"
    http_status = 400


class NotAVideoError(InputError):
    code = "not_a_video"
    http_status = 415


class UnsupportedCodecError(InputError):
    code = "unsupported_codec"
    http_status = 415


class CorruptVideoError(InputError):
    """The container is recognised but its data is damaged or truncated."""

    code = "corrupt_video"
    http_status = 422


class LimitExceededError(InputError):
    """The input is valid but beyond a configured limit (bytes, duration, pixels, frames)."""

    code = "limit_exceeded"
    http_status = 413


class InvalidPoseDataError(InputError):
    code = "invalid_pose_data"
    http_status = 422


class InvalidSettingError(InputError):
    """A stage setting (style, size, fps, ...) is out of range or malformed."""

    code = "invalid_setting"
    http_status = 422


class InvalidWeightsError(InputError):
    """A model weights file is missing, unreadable or of an unsupported architecture."""

    code = "invalid_weights"
    http_status = 422


class NotAnImageError(InputError):
    code = "not_an_image"
    http_status = 415


class CorruptImageError(InputError):
    """An image whose header reads but whose pixels do not decode."""

    code = "corrupt_image"
    http_status = 422
