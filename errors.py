"""The one error type for bad input. Every layer raises it for what the user can fix; the CLI prints
it as a single line (naming the file and the fix) and exits 2, without a traceback."""


class UserError(Exception):
    pass
