"""Type stubs of the extension module ``surfing_weights._native``."""

import os
from types import TracebackType
from typing import Any, Dict, List, Literal, Optional, Sequence, Type, Union, overload

import numpy as np
import numpy.typing as npt

__version__: str

class WeightServerError(ConnectionError):
    """A weight server could not be reached, or did not deliver the weights."""

class WeightServer:
    """A weight server for one model folder, serving its layers over QUIC
    from threads of this process."""

    def __init__(
        self,
        model_path: Union[str, "os.PathLike[str]"],
        cache_size_mb: int = 256,
        host: str = "127.0.0.1",
        port: int = 0,
        token: Optional[str] = None,
        dtype: str = "f32",
    ) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def __enter__(self) -> "WeightServer": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> bool: ...
    @property
    def is_running(self) -> bool: ...
    @property
    def address(self) -> str:
        """``host:port`` that clients connect to."""
    @property
    def cert_pem(self) -> str:
        """The server's self-signed certificate (PEM), for clients to pin."""
    @property
    def model_path(self) -> str: ...
    @property
    def dtype(self) -> str: ...

ServerSpec = Union[WeightServer, str]

class StreamingModel:
    """A sentence-embedding model whose weights are read from a folder or
    streamed from weight servers, layer by layer, under a GPU memory budget."""

    def __init__(
        self,
        model_path: Optional[Union[str, "os.PathLike[str]"]] = None,
        server: Optional[Union[ServerSpec, Sequence[ServerSpec]]] = None,
        server_cert: Optional[Union[str, "os.PathLike[str]"]] = None,
        token: Optional[str] = None,
        cache_size: Optional[int] = None,
        vram_budget_mb: Optional[int] = None,
        host_cache_mb: int = 512,
        prefetch: int = 2,
        eviction: str = "optimal",
        dtype: str = "f32",
    ) -> None: ...
    @overload
    def encode(
        self,
        sentences: Union[str, Sequence[str]],
        batch_size: int = 32,
        normalize_embeddings: Optional[bool] = None,
        prompt_name: Optional[str] = None,
        convert_to_numpy: Literal[True] = True,
        show_progress_bar: bool = False,
    ) -> npt.NDArray[np.float32]:
        """One text gives shape ``(dimension,)``, a list ``(len, dimension)``."""
    @overload
    def encode(
        self,
        sentences: str,
        batch_size: int = 32,
        normalize_embeddings: Optional[bool] = None,
        prompt_name: Optional[str] = None,
        *,
        convert_to_numpy: Literal[False],
        show_progress_bar: bool = False,
    ) -> List[float]: ...
    @overload
    def encode(
        self,
        sentences: Sequence[str],
        batch_size: int = 32,
        normalize_embeddings: Optional[bool] = None,
        prompt_name: Optional[str] = None,
        *,
        convert_to_numpy: Literal[False],
        show_progress_bar: bool = False,
    ) -> List[List[float]]: ...
    def tokenize(self, texts: Union[str, Sequence[str]]) -> Dict[str, npt.NDArray[np.int64]]: ...
    def get_inference_stats(self) -> Dict[str, Any]: ...
    def get_cache_info(self) -> Dict[str, Any]: ...
    def clear_cache(self) -> None: ...
    def warmup(self, layers: Optional[List[int]] = None) -> None: ...
    @property
    def cache_size(self) -> int:
        """Encoder layers held in GPU memory at once."""
    @cache_size.setter
    def cache_size(self, layers: int) -> None: ...
    @property
    def vram_budget_mb(self) -> Optional[float]:
        """The GPU memory budget for weights in MiB; ``None`` when unbounded."""
    @vram_budget_mb.setter
    def vram_budget_mb(self, megabytes: int) -> None: ...
    @property
    def dimension(self) -> int: ...
    @property
    def max_seq_length(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def model_id(self) -> str: ...
    def _time_engine(self, sentences: List[str], rounds: int) -> List[float]: ...
