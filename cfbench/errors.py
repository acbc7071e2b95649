"""The one exception type for bad user input.

Anything a user can get wrong (a name, a hyperparameter, a data file) raises `CfbenchError`
with a one-line message that names the problem and the fix; the CLI prints it and exits 2.
"""


class CfbenchError(Exception):
    """Bad input from the user; the message is shown as is, without a traceback."""
