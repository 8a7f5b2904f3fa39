"""The base of every error a user can fix (bad config, data, checkpoint, diverged run).

The CLI prints these as one line naming the culprit; anything else is a bug and keeps
its traceback.
"""


class SatSynthError(Exception):
  """An error whose message names the file, key or value to fix."""
