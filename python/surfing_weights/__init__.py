"""Sentence embeddings on any GPU through wgpu, with weights read from a model
folder or streamed layer by layer from weight servers under a memory budget.

``StreamingModel`` (also ``StreamingBertModel``, the original project's name)
embeds texts; ``WeightServer`` serves a model folder from this process.
"""

import asyncio
from typing import Any

from ._native import StreamingModel as _NativeModel
from ._native import WeightServer, WeightServerError, __version__

__all__ = [
    "StreamingModel",
    "StreamingBertModel",
    "WeightServer",
    "WeightServerError",
    "__version__",
]


class StreamingModel(_NativeModel):
    __doc__ = _NativeModel.__doc__

    async def encode_async(self, sentences: Any, **kwargs: Any) -> Any:
        """``encode`` on a worker thread, so that the event loop goes on
        meanwhile (the engine releases the GIL while it works)."""
        return await asyncio.to_thread(self.encode, sentences, **kwargs)


StreamingBertModel = StreamingModel
