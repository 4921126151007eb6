"""Every error nanovllm raises for a mistake a user can fix, in one place (pure Python).

Each is raised at the boundary where the bad value enters, and its message names the value,
the limit and the fix. The server maps them to OpenAI's error shape (server/app.py); the chat
template sandbox has its own (chat_template.TemplateLimitError), a jinja2 SecurityError.
"""


class InvalidRequestError(ValueError):
    """A request that can never run: empty, too long, or with token ids outside the vocabulary."""


class StepError(RuntimeError):
    """The model step raised: the requests it held were aborted (their blocks freed), and the
    engine can go on with the others. `request_ids` names them; `__cause__` is the error."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(
            f"the model step failed ({type(cause).__name__}: {cause}); its "
            f"{len(request_ids)} request(s) were aborted"
        )
        self.request_ids = request_ids


class BackendError(ValueError):
    """An unknown backend, a missing array library, or an option the backend cannot honour."""


class WeightsError(ValueError):
    """A weight file or tensor that is missing, corrupt, truncated or not supported.

    The message names the file (and the tensor when there is one) and says how to fix it.
    """


class ModelNotFoundError(ValueError):
    """A model argument that is neither a local directory or .gguf file nor a cached hub id."""


class DefaultModelError(RuntimeError):
    """The default model could not be fetched or read (offline, no pip, a broken download)."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached, or an engine replica could not start on it."""


class ConfigError(ValueError):
    """A model config whose sizes cannot be right."""


class UnsupportedArchitectureError(ValueError):
    """A config whose `architectures` names no model nanovllm implements."""


class UnsupportedFeatureError(ValueError):
    """A valid config that uses a feature nanovllm does not implement."""


class OutOfMemoryError(ValueError):
    """What a model or KV pool would take is more than the machine's available memory."""
