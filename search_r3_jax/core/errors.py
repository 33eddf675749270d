"""The base class of the project's errors of input or settings.

An error of this kind is the user's to fix (a missing file, a bad setting,
bad data), not a bug: the programs (`cli.run`) print its message as one line
`error: ...` and exit with status 2, without a traceback.
"""


class UserError(Exception):
  """Bad input or settings; the message names the file, line or field."""
