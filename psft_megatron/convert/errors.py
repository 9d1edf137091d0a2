"""The one exception type of the converters."""


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names what and why."""
