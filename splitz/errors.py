"""Errors a user can cause. Each maps once to an HTTP status (app) and a CLI message (cli)."""


class SplitzError(Exception):
    """Base class: the message is meant for the user, one line."""


class InputError(SplitzError):
    """A bad image, shape, or parameter value."""


class CheckpointError(SplitzError):
    """A model directory that is missing, corrupt, or does not match its card."""


class UnknownModelError(CheckpointError):
    """A model id that is not in the model repository."""


class InvalidModelError(InputError):
    """Weights or card fields that make no valid model (splitz import, uploads)."""


class ModelExistsError(InvalidModelError):
    """A model of that id exists and was not to be replaced."""


class ModelReplacedError(SplitzError):
    """The repository holds another version of a model than a job was submitted for."""


# The HTTP status of each error a client can cause, most specific first; anything else is 500.
HTTP_STATUS: tuple[tuple[type[SplitzError], int], ...] = (
    (ModelExistsError, 409), (ModelReplacedError, 409), (UnknownModelError, 404),
    (InputError, 422))


def http_status(e: SplitzError) -> int:
    """What the API answers for `e`, and what a job that failed on it reports."""
    return next((status for kind, status in HTTP_STATUS if isinstance(e, kind)), 500)


def first_line(e: BaseException) -> str:
    """A library exception's first line, for a one-line message (its name if it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
