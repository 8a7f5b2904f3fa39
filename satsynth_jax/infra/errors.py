"""The base of every error a user can fix (bad config, data, checkpoint, diverged run).

The CLI prints these as one line naming the culprit; anything else is a bug and keeps
its traceback.
"""


class SatSynthError(Exception):
  """An error whose message names the file, key or value to fix."""


class ConfigError(SatSynthError, ValueError):
  """A config value no job can run with; the message names the key, the value and what is allowed."""
