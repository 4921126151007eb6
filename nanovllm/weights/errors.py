"""The one error the weight loaders raise."""


class WeightsError(ValueError):
    """A weight file or tensor that is missing, corrupt, truncated or not supported.

    The message names the file (and the tensor when there is one) and says how to fix it.
    """
