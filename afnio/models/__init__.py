"""Model clients: one protocol (:class:`ChatCompletionModel`) over every provider."""

from afnio.models.model import ChatCompletionModel, client_from_config, client_to_config

__all__ = ["ChatCompletionModel", "client_from_config", "client_to_config"]
