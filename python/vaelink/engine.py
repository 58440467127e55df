"""The local engine: exported VAEs run by ONNX Runtime - the CUDA execution provider when present,
the CPU provider otherwise (or OpenVINO, for bfloat16 on CPUs that have it) - with batches sliced
and images tiled to fit a memory budget.

No torch at run time; torch tensors are accepted and returned when given (bound in place)."""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import processing
from .batches import (
    ImageBatch,
    ImageInput,
    LatentBatch,
    LatentInput,
    RawOutput,
    as_image_batch,
    as_latent_batch,
)
from .cards import DEFAULT_MODEL, ModelCard, Scaling
from .errors import (
    CorruptExportError,
    EngineError,
    NonFiniteOutputError,
    ProviderUnavailableError,
    TensorError,
    VaelinkWarning,
)
from .exact import ExactProgram, run_fast
from .exports import Manifest, ModelLike, read_manifest, resolve_model
from .frameworks import Array, array_namespace, is_torch, to_numpy, to_torch, torch
from .openvino_session import OpenVinoSession, bfloat16_native, load_openvino
from .runtime import (
    CUDNN_SEARCH,
    CudnnSearch,
    activation_budget,
    binding_device,
    cuda_provider_options,
    cuda_session_providers,
    cuda_unavailable,
    gpu_memory,
    lists_cuda,
    load_onnxruntime,
    preload_cuda_libraries,
    share_cuda_arena,
)
from .tiling import TileGrid, check_cancelled, run_tiled

__all__ = ["DType", "Engine", "MemoryModel", "Provider", "default_cpu_dtype"]

Provider = Literal["auto", "cpu", "cuda"]
DType = Literal["float32", "float16", "bfloat16"]
Tiling = Literal["exact", "fast", "blended"]

CPU_DTYPE_VARIABLE = "VAELINK_CPU_DTYPE"
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


@functools.cache
def _register_shared_arena() -> bool:
    """One CPU arena for the process, shared by sessions opened with `use_env_allocators`; False
    when it cannot be registered (another library did first: sessions then keep their own)."""
    ort = load_onnxruntime()
    cpu = ort.OrtMemoryInfo(
        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    try:
        ort.create_and_register_allocator(cpu, ort.OrtArenaCfg({}))
    except Exception:  # onnxruntime raises its own exception types
        return False
    return True


def default_cpu_dtype() -> DType:
    """bfloat16 where the CPU computes it natively and OpenVINO is installed, else float32;
    `VAELINK_CPU_DTYPE=float32` (or `bfloat16`) decides instead, for a whole service or test run."""
    chosen = os.environ.get(CPU_DTYPE_VARIABLE) or "auto"
    if chosen in ("float32", "bfloat16"):
        return "bfloat16" if chosen == "bfloat16" else "float32"
    if chosen != "auto":
        raise EngineError(f"{CPU_DTYPE_VARIABLE}={chosen!r}: expected auto, float32 or bfloat16")
    return "bfloat16" if bfloat16_native() else "float32"


def _check_bfloat16() -> None:
    load_openvino()  # RuntimeMissingError naming the extra
    if not bfloat16_native():
        raise ProviderUnavailableError(
            "bfloat16 on the CPU needs native bfloat16 arithmetic (AVX512-BF16 or AMX), which "
            "this CPU lacks (OpenVINO's capabilities); use float32"
        )


def available_memory() -> int:
    """Bytes of RAM available now (Linux), else a conservative 4 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


# Full-resolution float32 maps exact tiling holds at its peak, in units of the widest one: a
# resnet's input, its two outputs and the strips being gathered (measured 5.3 on a 4096 x 4096
# decode of the medium benchmark model, 10.5 GiB; benches/results/engine-peak-cpu-vm-xeon.json).
EXACT_HOST_MAPS = 6


@dataclass(frozen=True)
class MemoryModel:
    """Peak activation memory of one image through a graph, from the architecture's widths.

    Convolutions keep a few full-resolution feature maps of the widest full-resolution block alive;
    the mid-block attention of AutoencoderKL adds an (h*w)^2 score matrix at latent resolution in
    exports that hold it (`scores`: before attention became ONNX Runtime's MultiHeadAttention)."""

    full_res_channels: int
    attention: bool
    spatial_factor: int = 8
    live_maps: int = 6
    scores: bool = True

    def bytes(self, height: int, width: int, itemsize: int) -> int:
        pixels = height * width
        tokens = pixels // self.spatial_factor**2
        conv = self.live_maps * self.full_res_channels * pixels * itemsize
        attention = tokens * tokens * itemsize if self.attention and self.scores else 0
        return conv + attention


def _check_card(card: ModelCard, manifest: Manifest, folder: Path) -> None:
    """An export made for other constants than the card's would decode garbage."""
    exported = manifest.card
    fields = ("architecture", "latent_channels", "spatial_factor")
    if any(getattr(exported, f) != getattr(card, f) for f in fields):
        raise CorruptExportError(
            f"{folder} was exported for {exported.name} ({exported.architecture}, "
            f"{exported.latent_channels} channels), not {card.name}; export it again"
        )


class Engine:
    """Runs one exported model; a `vaelink.backend.Backend`.

    `model` is a card name (exported with `vaelink export NAME`, or bundled) or an export folder.
    `provider`: `auto` picks CUDA when onnxruntime-gpu is installed and its CUDA provider really
    loads (the engine opens a session at once and checks), else the CPU with one warning; `cuda`
    raises `ProviderUnavailableError` instead. `dtype`: float16 by default on CUDA; on the CPU
    bfloat16 through OpenVINO where the CPU computes it natively (AVX512-BF16 or AMX) and OpenVINO
    is installed (`vaelink[openvino]`), else float32. Non-finite reduced-precision pieces are
    recomputed in float32, and exact and fast tiling's segments run in float32. `memory_limit`
    (bytes) caps the activation memory vaelink plans for; on CUDA it also caps ONNX Runtime's arena on the device,
    one arena shared by every session of the process (the first engine on a device sets it).
    Without it a GPU plans from the card's free memory at start, less the weights and a headroom.
    `tile_size` (pixels, a multiple of the spatial factor) overrides the tiling policy: 512 on the
    CPU, 1024 on CUDA. numpy input runs on GPU `device_id`; torch CUDA tensors on their own GPU.

    Args:
        model: A card name (exported or bundled), an export folder, or a resolved `Model`.
        provider: `auto`, `cpu` or `cuda`.
        dtype: `float32`, `float16` or, on the CPU, `bfloat16` (default: float16 on CUDA; on the
            CPU bfloat16 where native and OpenVINO is installed, else float32).
        memory_limit: Bytes of activation memory to plan for (default: on CUDA the device's free
            memory less weights and headroom, 8 GiB if it cannot be read; half the available RAM
            on the CPU).
        tile_size: The tile side in pixels, a multiple of the spatial factor, at least twice it.
        device_id: The CUDA device for numpy input (CUDA tensors run where they are).
        cudnn_search: How cuDNN picks convolution algorithms for each new shape: `exhaustive`
            (ONNX Runtime's default: fastest kernels, seconds of search per new shape), `heuristic`
            (no search: for services whose shapes vary) or `default`.

    Raises:
        UnknownModelError: A name with no model card.
        ModelNotExportedError: A known model that is not exported on this machine.
        CorruptExportError: An export whose manifest or files are missing, changed or invalid, or
            made for another model than its card.
        RuntimeMissingError: ONNX Runtime is not installed (or OpenVINO, for `bfloat16`).
        ProviderUnavailableError: `provider="cuda"` and the CUDA provider does not load, or
            `dtype="bfloat16"` on a CPU without native bfloat16.
        EngineError: An unknown `provider`, `dtype` or `cudnn_search`, an invalid `tile_size`,
            or `bfloat16` asked for on CUDA.
    """

    def __init__(
        self,
        model: ModelLike = DEFAULT_MODEL,
        *,
        provider: Provider = "auto",
        dtype: DType | None = None,
        memory_limit: int | None = None,
        tile_size: int | None = None,
        device_id: int = 0,
        cudnn_search: CudnnSearch = "exhaustive",
    ) -> None:
        resolved = resolve_model(model)
        self.folder = resolved.export_folder()
        self.manifest: Manifest = read_manifest(self.folder)
        self.card: ModelCard = resolved.card
        _check_card(self.card, self.manifest, self.folder)
        ort = load_onnxruntime()
        if provider not in ("auto", "cpu", "cuda"):
            raise EngineError(f"unknown provider {provider!r}; expected auto, cpu or cuda")
        if cudnn_search not in CUDNN_SEARCH:
            raise EngineError(
                f"unknown cudnn_search {cudnn_search!r}; expected exhaustive, heuristic or default"
            )
        if dtype not in (None, "float32", "float16", "bfloat16"):
            raise EngineError(f"unknown dtype {dtype!r}; expected float32, float16 or bfloat16")
        if dtype == "bfloat16" and provider == "cuda":
            raise EngineError("bfloat16 runs on the CPU (OpenVINO); CUDA runs float16 or float32")
        self.requested_provider: Provider = provider
        # bfloat16 asked for is a CPU engine even where CUDA is there.
        cuda = provider == "cuda" or (
            provider == "auto" and dtype != "bfloat16" and lists_cuda(ort)
        )
        self.provider: Literal["cpu", "cuda"] = "cuda" if cuda else "cpu"
        self._explicit_dtype = dtype
        self.dtype: DType = dtype or ("float16" if cuda else default_cpu_dtype())
        self.memory_limit = memory_limit
        self.device_id = device_id
        self.cudnn_search: CudnnSearch = cudnn_search
        self._device_budgets: dict[int, int] = {}
        f = self.card.spatial_factor
        if tile_size is not None and (tile_size < 2 * f or tile_size % f):
            raise EngineError(f"tile_size must be a multiple of {f} and at least {2 * f}")
        self.tile_size = tile_size
        config = self.manifest.source.get("config", {})
        self.memory = MemoryModel(
            full_res_channels=int(config.get("full_res_channels", 128)),
            attention=bool(config.get("attention", self.card.has_posterior)),
            spatial_factor=self.card.spatial_factor,
            scores=not config.get("flash_attention", False),
        )
        self._sessions: dict[tuple[str, str, int], Any] = {}
        self._noted_blended = False
        if cuda:
            self._start_cuda(ort)
        if self.dtype == "bfloat16":
            _check_bfloat16()

    @property
    def execution_providers(self) -> list[str]:
        """The runtimes the engine's sessions use, in order of preference: ONNX Runtime's
        providers, behind OpenVINO's CPU plugin for bfloat16 (float32 retries and segments stay
        with ONNX Runtime)."""
        cuda = ["CUDAExecutionProvider"] if self.provider == "cuda" else []
        openvino = ["OpenVINO CPU (bfloat16)"] if self.dtype == "bfloat16" else []
        return [*openvino, *cuda, "CPUExecutionProvider"]

    def __repr__(self) -> str:
        where = f"cuda:{self.device_id}" if self.provider == "cuda" else "cpu"
        return (
            f"Engine({self.card.name!r}, provider={self.provider!r} ({where}, "
            f"{', '.join(self.execution_providers)}), dtype={self.dtype!r})"
        )

    def _start_cuda(self, ort: Any) -> None:
        """Loads the CUDA libraries, plans the device's memory and checks, on a small graph, that
        ONNX Runtime's CUDA provider really loads (the model's own graphs may not even build on
        the CPU: the float16-cuda variant's fused kernels are CUDA-only); `auto` falls back to the
        CPU with one warning, `cuda` raises."""
        preload_cuda_libraries(ort)
        self._budget(self.device_id)  # read the card's free memory before any weights load
        options = cuda_provider_options(self.device_id, self.cudnn_search, None)
        providers = cuda_session_providers(ort, options)
        if "CUDAExecutionProvider" in providers:
            return
        reason = cuda_unavailable(providers)
        if self.requested_provider == "cuda":
            raise ProviderUnavailableError(reason)
        dtype = self._explicit_dtype or default_cpu_dtype()
        warnings.warn(
            f"{reason}; running {self.card.name} on the CPU in {dtype} (`vaelink doctor` tells why)",
            VaelinkWarning,
            stacklevel=3,
        )
        self.provider, self.dtype = "cpu", dtype

    # -- sessions -------------------------------------------------------------------------------

    def _variant(self, dtype: str) -> str:
        variants = self.manifest.variants
        if dtype == "float16" and self.provider == "cuda" and "float16-cuda" in variants:
            return "float16-cuda"
        if dtype == "bfloat16":  # OpenVINO compiles the float32 graph in bfloat16
            dtype = "float32"
        if dtype not in variants:
            raise EngineError(f"{self.card.name} has no {dtype} export; export it again")
        return dtype

    def _session(self, part: str, dtype: str, device: int | None = None) -> Any:
        variant = self._variant(dtype)
        key = (part, dtype if dtype == "bfloat16" else variant, self._device(device))
        if key not in self._sessions:
            path = self.folder / self.manifest.variants[variant][part]["file"]
            if dtype == "bfloat16":
                self._sessions[key] = OpenVinoSession(path, "bfloat16")
            else:
                self._sessions[key] = self._open(path, key[2])
        return self._sessions[key]

    def _segment_session(self, file: str) -> Any:
        key = ("segment", file, self._device(None))
        if key not in self._sessions:
            self._sessions[key] = self._open(self.folder / file, key[2])
        return self._sessions[key]

    def _device(self, device: int | None) -> int:
        """The CUDA device a run uses (`device_id` unless a tensor says otherwise); 0 on the CPU."""
        if self.provider != "cuda":
            return 0
        return self.device_id if device is None else device

    def _open(self, path: Path, device: int) -> Any:
        ort = load_onnxruntime()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # CPU buffers come from the process's one arena: with an arena per session, each keeping
        # its largest run's buffers, exact tiling's dozens of segments held a gigabyte more.
        shared = _register_shared_arena()
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.provider == "cuda":
            cuda = cuda_provider_options(device, self.cudnn_search, None)
            limit = self._budget(device) + self._weights_bytes()  # weights load through it too
            # One capped arena per device for all sessions; else each session capped on its own.
            if share_cuda_arena(ort, device, limit, cuda):
                shared = True
            else:
                cuda = cuda_provider_options(device, self.cudnn_search, limit)
            providers.insert(0, ("CUDAExecutionProvider", cuda))
        if shared:
            options.add_session_config_entry("session.use_env_allocators", "1")
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(f"cannot load {path}: {e}") from e
        if self.provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            # ONNX Runtime logs one line and builds a CPU session when CUDA or cuDNN fail to load.
            raise ProviderUnavailableError(cuda_unavailable(session.get_providers(), path.name))
        return session

    def _run_graph(self, part: str, x: Any) -> Any:
        """One forward pass in the engine's dtype; non-finite float16 or bfloat16 output is redone
        in float32. numpy arrays go through `session.run`; torch tensors stay on their device (IO
        binding; through host memory for OpenVINO). What is still non-finite then is refused: NaN
        images or latents are never an answer."""
        run = self._run_tensor if is_torch(x) else self._run_session
        result = run(part, x, self.dtype)
        finite = bool(array_namespace(result).isfinite(result).all())
        if not finite and self.dtype != "float32":
            # float32 needs twice the memory: the slice is split to the float32 plan.
            h, w = self._pixels(part, x.shape)
            slices = self._batch_slices(len(x), h, w, itemsize=4)
            pieces = [run(part, x[s], "float32") for s in slices]
            result = pieces[0] if len(pieces) == 1 else array_namespace(x).concatenate(pieces)
            finite = bool(array_namespace(result).isfinite(result).all())
        if not finite:
            what = "latents far outside the model's range?" if part == "decoder" else "images"
            raise NonFiniteOutputError(
                f"{self.card.name} {part} output contains NaN or infinity for finite input ({what})"
            )
        return result

    def _pixels(self, part: str, shape: Sequence[int]) -> tuple[int, int]:
        """The image size in pixels of a graph input's shape."""
        f = 1 if part == "encoder" else self.card.spatial_factor
        return shape[2] * f, shape[3] * f

    def _out_shape(self, part: str, shape: Sequence[int]) -> tuple[int, ...]:
        b, _, h, w = shape
        f = self.card.spatial_factor
        if part == "decoder":
            return (b, 3, h * f, w * f)
        c = self.card.latent_channels * (2 if self.card.has_posterior else 1)
        return (b, c, h // f, w // f)

    def _run_tensor(self, part: str, x: Any, dtype: str) -> Any:
        """A torch tensor through ONNX Runtime's IO binding, or through host memory for OpenVINO."""
        if dtype == "bfloat16":
            return to_torch(self._run_session(part, to_numpy(x), dtype), x)
        return self._run_bound(part, x, dtype)

    def _run_bound(self, part: str, x: Any, dtype: str) -> Any:
        """Runs on torch memory in place: input and output bound to the tensors' device buffers.
        A CUDA tensor runs on its own GPU; a tensor the session cannot read (CUDA for a CPU
        session, MPS, XPU) goes through host memory, and the result returns to its device."""
        t = torch()
        home = x.device
        kind, index = binding_device(home.type, home.index, self.provider)
        if kind == "cuda" and index is None:
            index = t.cuda.current_device()
        torch_dtype = t.float16 if dtype == "float16" else t.float32
        x = x.to(device=home if kind == "cuda" else "cpu", dtype=torch_dtype).contiguous()
        session = self._session(part, dtype, index)
        out = t.empty(self._out_shape(part, x.shape), dtype=torch_dtype, device=x.device)
        if kind == "cuda":
            # ONNX Runtime runs on a stream of its own and does not wait for torch's: `x` may still
            # be written, and `out` reuse memory a pending kernel reads, until torch's stream is done.
            t.cuda.current_stream(x.device).synchronize()
        binding = session.io_binding()
        for bind, arg, tensor in (
            (binding.bind_input, session.get_inputs()[0], x),
            (binding.bind_output, session.get_outputs()[0], out),
        ):
            bind(
                arg.name, kind, index or 0, np.dtype(dtype), tuple(tensor.shape), tensor.data_ptr()
            )
        try:
            session.run_with_iobinding(binding)  # returns once ONNX Runtime's stream is done
        except Exception as e:
            raise EngineError(
                f"{self.card.name} {part} failed on input {tuple(x.shape)}: {e}"
            ) from e
        return out.float().to(home)

    def _run_session(self, part: str, x: np.ndarray, dtype: str) -> np.ndarray:
        session = self._session(part, dtype)
        fed = np.float16 if dtype == "float16" else np.float32  # OpenVINO takes bfloat16's float32
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=fed)}
        try:
            (out,) = session.run(None, feed)
        except Exception as e:
            raise EngineError(f"{self.card.name} {part} failed on input {x.shape}: {e}") from e
        return np.asarray(out, dtype=np.float32)

    # -- planning -------------------------------------------------------------------------------

    def _budget(self, device: int | None = None) -> int:
        """Bytes of activations to plan for: `memory_limit`; on a GPU its free memory at the
        engine's start less weights and headroom; on the CPU half the available RAM."""
        if self.memory_limit:
            return self.memory_limit
        if self.provider != "cuda":
            return available_memory() // 2
        device = self._device(device)
        if device not in self._device_budgets:
            budget = activation_budget(gpu_memory(device), self._weights_bytes())
            self._device_budgets[device] = budget
        return self._device_budgets[device]

    def _weights_bytes(self) -> int:
        """What the sessions a run may open hold on the device: the engine's variant, the float32
        retry's and exact tiling's segments (an upper bound: each is loaded only when used)."""
        variants = {self._variant(self.dtype), "float32"}
        files = [e for v in variants for e in self.manifest.variants[v].values()]
        files += [s for steps in self.manifest.segments.values() for s in steps if "file" in s]
        return sum(int(e["bytes"]) for e in [*files, *self.manifest.data_files])

    def _itemsize(self) -> int:
        return 2 if self.dtype == "float16" else 4

    def _plan(self, height: int, width: int, tile: bool | None, grid: TileGrid) -> TileGrid | None:
        """Tiles when asked to, or when one image would not fit the budget."""
        if tile is False:
            return None
        too_big = self.memory.bytes(height, width, self._itemsize()) > self._budget()
        return grid if tile or too_big else None

    def _batch_slices(
        self, n: int, height: int, width: int, itemsize: int | None = None
    ) -> list[slice]:
        per_image = max(1, self.memory.bytes(height, width, itemsize or self._itemsize()))
        step = max(1, min(n, self._budget() // per_image))
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _tile_px(self) -> int:
        if self.tile_size:
            return self.tile_size
        return 1024 if self.provider == "cuda" else 512

    def planned_bytes(self, batch: int, height: int, width: int, tile: bool | None = None) -> int:
        """The activation memory one encode or decode of `batch` images of `height x width` pixels
        plans for: a tile when it is tiled, else the largest batch slice (the server reserves it
        before queueing a request)."""
        itemsize = self._itemsize()
        if self._plan(height, width, tile, TileGrid(1, 0)) is not None:
            t = self._tile_px()
            return self.memory.bytes(min(t, height), min(t, width), itemsize)
        step = int(self._batch_slices(batch, height, width)[0].stop)
        return step * self.memory.bytes(height, width, itemsize)

    def _apply(
        self,
        part: str,
        x: Array,
        height: int,
        width: int,
        tile: bool | None,
        grid: TileGrid,
        cancel: threading.Event | None,
        tiling: Tiling | None = None,
    ) -> Array:
        plan = self._plan(height, width, tile, grid)
        run: Callable[[Array], Array] = lambda t: self._run_graph(part, t)  # noqa: E731
        # One tile covering the image is the whole graph: exact already, and faster than segments.
        one_tile = max(height, width) <= self._tile_px()
        mode = self._tiling(part, tiling, height, width) if plan is not None else None
        if plan is not None and not one_tile and mode == "exact":
            pieces = [self._run_exact(part, x[i : i + 1], height, cancel) for i in range(len(x))]
        elif plan is not None and not one_tile and mode == "fast":
            pieces = [self._run_fast(part, x[i : i + 1], plan, cancel) for i in range(len(x))]
        elif plan is not None:
            pieces = [run_tiled(run, x[i : i + 1], plan, cancel) for i in range(len(x))]
        else:
            pieces = []
            for s in self._batch_slices(len(x), height, width):
                check_cancelled(cancel)
                pieces.append(run(x[s]))
        return pieces[0] if len(pieces) == 1 else array_namespace(x).concatenate(pieces)

    def _tiling(self, part: str, tiling: Tiling | None, height: int, width: int) -> Tiling:
        """Exact or fast when asked; by default, when the export has segments, exact if the host
        maps exact tiling keeps (a few full-resolution maps, float32) fit the budget, else fast
        (statistics from a downscaled pass, nothing full-resolution kept); blended otherwise."""
        if tiling not in (None, "exact", "fast", "blended"):
            raise EngineError(f"unknown tiling {tiling!r}; expected exact, fast, blended or None")
        if tiling == "blended":
            return "blended"
        if not self._has_segments(part):
            if tiling in ("exact", "fast"):
                raise EngineError(
                    f"{self.folder} has no segments for {tiling} tiling (a model without "
                    "normalisation, or exported by an older vaelink); export it again"
                )
            if self.memory.attention and not self._noted_blended:
                self._noted_blended = True
                warnings.warn(
                    f"{self.card.name}: this export predates exact tiling; tiles are blended and "
                    "may shift in colour (export the model again for exact tiling)",
                    stacklevel=4,
                )
            return "blended"
        host = EXACT_HOST_MAPS * 4 * self.memory.full_res_channels * height * width
        budget = available_memory() // 2 if self.provider == "cuda" else self._budget()
        if tiling == "exact" or (tiling is None and host <= budget):
            return "exact"
        if not self.manifest.fused.get(part):
            if tiling == "fast":
                raise EngineError(
                    f"{self.folder} has no fused graphs for fast tiling (exported by an older "
                    "vaelink); export it again"
                )
            return "exact"  # the only way this export keeps the norms right
        return "fast"

    def _has_segments(self, part: str) -> bool:
        """Segments this vaelink runs: those of exports before row strips count as none."""
        return ExactProgram.runs(self.manifest.segments.get(part) or [])

    def _run_segments(
        self, part: str, x: Array, run: Callable[[ExactProgram, np.ndarray], np.ndarray]
    ) -> Array:
        """One image through `part`'s segments (`run`: exact or fast); maps live on the host,
        tiles go to the runtime. Non-finite output is refused, as from the whole graph."""
        program = ExactProgram(self.manifest.segments[part], self._segment_session)
        out = run(program, np.asarray(to_numpy(x), np.float32))
        if not np.isfinite(out).all():
            raise NonFiniteOutputError(f"{self.card.name} {part} output contains NaN or infinity")
        return to_torch(out, x) if is_torch(x) else out

    def _run_exact(self, part: str, x: Array, height: int, cancel: threading.Event | None) -> Array:
        # `height` is the image's in pixels for both parts: tiles scale to each step's resolution.
        return self._run_segments(
            part, x, lambda program, a: program.run(a, self._tile_px(), height, cancel)
        )

    def _run_fast(
        self, part: str, x: Array, grid: TileGrid, cancel: threading.Event | None
    ) -> Array:
        """Tile by tile, with statistics from a downscaled pass."""
        align = self.card.spatial_factor if part == "encoder" else 1
        fused = self._segment_session(self.manifest.fused[part]["file"])
        return self._run_segments(
            part, x, lambda program, a: run_fast(program, fused, a, grid, align, cancel)
        )

    # -- public API -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """An encode and a decode per shape that requests will run, so that the first request pays
        neither for loading graphs nor, on CUDA, for cuDNN's algorithm search on a new shape: a
        small image, and on CUDA one tile of the tiling grid (every tile has the tile's shape)."""
        f, c = self.card.spatial_factor, self.card.latent_channels
        sizes = [8 * f, self._tile_px()] if self.provider == "cuda" else [8 * f]
        for size in sizes:
            self.decode(
                np.zeros((1, c, size // f, size // f), np.float32), output="float", tile=False
            )
            self.encode(np.zeros((1, 3, size, size), np.float32), tile=False)

    def encode(
        self,
        images: ImageInput | ImageBatch,
        /,
        *,
        sample: bool = False,
        seed: int | None = None,
        noise: np.ndarray | None = None,
        tile: bool | None = None,
        scaling: Scaling | None = None,
        cancel: threading.Event | None = None,
        tiling: Tiling | None = None,
    ) -> Any:
        """Images -> scaled latents `[B, C, H/8, W/8]` float32 (a torch tensor when given one).

        `images`: uint8 `HWC`/`NHWC` arrays, PIL images, paths or bytes (a list of same-size images
        is a batch), or float `NCHW` in [-1, 1] (numpy or torch). AutoencoderKL models return the
        posterior mean, or with `sample=True` `mean + std * noise` (noise from `seed`, or given).
        `scaling`: the latents' normalisation (default: the card's). `cancel`: when set (from another
        thread), the call stops before its next tile or batch slice with `OperationCancelledError`.
        `tiling` (when tiled): `"exact"` - GroupNorm statistics over the whole image and attention
        over all positions, so tiles equal the untiled pass (AutoencoderKL exports with segments);
        `"fast"` - GroupNorm statistics from a downscaled pass of the whole image, then tiles run
        with them (attention within the tile) and are blended: close to untiled, no full-size maps
        kept; `"blended"` - tiles run whole and are blended; None - exact where the export allows
        it and its host maps fit the budget, else fast (blended for exports without segments).
        Output that is NaN or infinite raises `NonFiniteOutputError`.

        Args:
            images: The images, as above, or an `ImageBatch`. Sides must be multiples of the
                spatial factor (`vaelink.fit_to_multiple` crops or resizes).
            sample: Sample the posterior instead of taking its mean.
            seed: The seed of the sampling noise (numpy's generator; None: fresh noise).
            noise: The sampling noise itself, the latents' shape (instead of `seed`).
            tile: True to tile, False never to, None (default) when an image would not fit the
                memory budget.
            scaling: The latents' normalisation (default: the card's).
            cancel: An event that stops the call when set.
            tiling: `exact`, `fast`, `blended`, or None, as above.

        Returns:
            The scaled latents, float32: a numpy array, or a torch tensor on the input's device.

        Raises:
            TensorError: Images of a bad shape, dtype or size, empty, or non-finite; `noise` of
                the wrong shape.
            DecodeError: An image file or bytes that cannot be decoded.
            OSError: An image path that cannot be read.
            EngineError: ONNX Runtime could not load or run the model, the export lacks what the
                `tiling` asked for needs, or an unknown `tiling`.
            NonFiniteOutputError: The output is NaN or infinite for finite input.
            OperationCancelledError: `cancel` was set.
        """
        moments = self.moments(images, tile=tile, cancel=cancel, tiling=tiling)
        z = self._posterior(moments, sample, seed, noise)
        return (scaling or self.card.scaling).apply(z)

    def moments(
        self,
        images: ImageInput | ImageBatch,
        /,
        *,
        tile: bool | None = None,
        cancel: threading.Event | None = None,
        tiling: Tiling | None = None,
    ) -> Any:
        """Images -> the encoder's output, unscaled, float32: for AutoencoderKL models the
        posterior's moments `[B, 2C, H/8, W/8]` (mean, then log-variance, unclamped: diffusers'
        `DiagonalGaussianDistribution(moments)` is the posterior), for tiny ones the latents
        `[B, C, H/8, W/8]`. Takes what `encode` takes.

        Args:
            images: As for `encode`.
            tile: As for `encode`.
            cancel: As for `encode`.
            tiling: As for `encode`.

        Returns:
            The unscaled encoder output, float32: numpy, or torch on the input's device.

        Raises:
            TensorError, DecodeError, OSError, EngineError, NonFiniteOutputError,
            OperationCancelledError: As for `encode`.
        """
        x = as_image_batch(images, self.card.spatial_factor, fit=None).nchw_float()
        self._check_image_tensor(x)
        grid = TileGrid(self._tile_px(), self._tile_px() // 4, num=1, den=self.card.spatial_factor)
        return self._apply("encoder", x, x.shape[2], x.shape[3], tile, grid, cancel, tiling)

    def _posterior(
        self, moments: Array, sample: bool, seed: int | None, noise: Array | None
    ) -> Array:
        if not self.card.has_posterior:
            return moments  # tiny autoencoders are deterministic
        c = self.card.latent_channels
        mean, logvar = moments[:, :c], moments[:, c:]
        if not sample:
            return mean
        if noise is None:
            # numpy's generator for both kinds of input, so a seed means the same noise everywhere.
            noise = np.random.default_rng(seed).standard_normal(tuple(mean.shape), np.float32)
        xp = array_namespace(mean)
        if xp is np:  # float32 like the latents (float64 noise would promote them)
            noise = np.asarray(noise, dtype=np.float32)
        else:
            noise = xp.as_tensor(noise, dtype=mean.dtype, device=mean.device)
        if tuple(noise.shape) != tuple(mean.shape):
            raise TensorError(
                f"noise has shape {tuple(noise.shape)}, latents have {tuple(mean.shape)}"
            )
        std = xp.exp(0.5 * xp.clip(logvar, *LOGVAR_RANGE))
        return mean + std * noise

    def decode(
        self,
        latents: LatentInput | LatentBatch,
        /,
        *,
        height: int | None = None,
        width: int | None = None,
        output: RawOutput = "uint8",
        tile: bool | None = None,
        scaling: Scaling | None = None,
        cancel: threading.Event | None = None,
        tiling: Tiling | None = None,
    ) -> Any:
        """Scaled latents -> images: uint8 `[B, H, W, 3]` (default) or the raw float `[B, 3, H, W]`
        decoder output (`output="float"`). Packed 3-D latents `[B, HW/4, 4C]` need `height` and
        `width` (the image size in pixels). `scaling`: the latents' normalisation (default: the
        card's). `cancel` and non-finite output: as `encode`.

        Args:
            latents: Scaled latents, numpy or torch, or a `LatentBatch`.
            height: The image height in pixels, for packed latents.
            width: The image width in pixels, for packed latents.
            output: `uint8` or `float`.
            tile: As for `encode`.
            scaling: The latents' normalisation (default: the card's).
            cancel: As for `encode`.
            tiling: As for `encode`.

        Returns:
            The images: numpy, or torch on the input's device.

        Raises:
            TensorError: An unknown `output`; latents of a bad shape or channel count, empty,
                non-finite, or packed without `height` and `width`.
            EngineError, NonFiniteOutputError, OperationCancelledError: As for `encode`.
        """
        if output not in ("uint8", "float"):
            raise TensorError(f"unknown output {output!r}; expected uint8 or float")
        z = as_latent_batch(latents, height, width, channels=self.card.latent_channels).unpacked()
        self._check_latents(z)
        z = (scaling or self.card.scaling).invert(z)
        f = self.card.spatial_factor
        tile_latent = self._tile_px() // f
        grid = TileGrid(tile=tile_latent, overlap=tile_latent // 4, num=f, den=1)
        image = self._apply(
            "decoder", z, z.shape[2] * f, z.shape[3] * f, tile, grid, cancel, tiling
        )
        if output == "float":
            return image
        if is_torch(image):
            # The same expression as vaelink.postprocess, in torch on the tensor's device.
            pixels = ((image / 2 + 0.5).clip(0, 1) * 255).round()
            return pixels.to(torch().uint8).permute(0, 2, 3, 1).contiguous()
        return processing.postprocess(image)

    # -- validation -----------------------------------------------------------------------------

    def _check_image_tensor(self, x: Array) -> None:
        f = self.card.spatial_factor
        if x.ndim != 4 or x.shape[1] != 3:
            raise TensorError(f"images must be 3-channel NCHW, got shape {x.shape}")
        if x.shape[0] == 0:
            raise TensorError("empty batch")
        if x.shape[2] % f or x.shape[3] % f or x.shape[2] == 0 or x.shape[3] == 0:
            raise TensorError(
                f"image size {x.shape[2]}x{x.shape[3]} must be a positive multiple of {f} "
                "(vaelink.fit_to_multiple crops or resizes)"
            )
        if not bool(array_namespace(x).isfinite(x).all()):
            raise TensorError("images contain NaN or infinity")

    def _check_latents(self, z: Array) -> None:
        c = self.card.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise TensorError(f"{self.card.name} latents must be [B, {c}, H, W], got {z.shape}")
        if 0 in z.shape:
            raise TensorError(f"empty latents {z.shape}")
        if not bool(array_namespace(z).isfinite(z).all()):
            raise TensorError("latents contain NaN or infinity")
