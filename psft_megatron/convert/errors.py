"""The one exception type of the converters."""

from psft_megatron.errors import UserError


class ConversionError(UserError, ValueError):
    """A checkpoint, model directory, config or argument that cannot be converted; the message
    names the file, key or option and why. The tools print ``exc.line()`` (``conversion error:
    ...``) and exit with status 2, without a traceback."""

    kind = "conversion"
