"""The one exception type users see: its message is a single line that says what is wrong and how to fix it."""


class AquilaNpuError(Exception):
    """A user-facing error. Command-line entry points print ``aquila-npu: error: <message>`` and exit with 2."""
