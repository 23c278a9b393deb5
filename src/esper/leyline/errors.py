"""Typed errors raised when bytes or messages break the Leyline contract."""


class LeylineError(ValueError):
    """Base class: a message or its bytes violate the Leyline contract."""


class LeylineDecodeError(LeylineError):
    """Bytes could not be parsed as the expected Leyline message."""


class LeylineSizeError(LeylineError):
    """Bytes or a message exceed the allowed size."""


class LeylineValidationError(LeylineError):
    """A parsed message is structurally valid protobuf but breaks a Leyline rule."""
