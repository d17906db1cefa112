"""How a loaded program runs: device, precision, graph optimisation, batch padding.

``torch.export`` gives a portable, pickle-free program, but ``ExportedProgram.module()`` runs it
op by op through Python (``OpOverload.__call__`` per aten op, the GIL held between kernels):
about 70 us of overhead per call even for a tiny MLP, and a 15-20 % slower CNN than a frozen
graph, because batch norms stay separate from their convolutions. So, once per load:

* ``optimize="trace"``: trace the exported module into a TorchScript graph and freeze it
  (weights become constants, conv+BN fold, the interpreter runs in C++ without per-op Python).
  Tracing can bake a shape into the graph, so the result is checked against the exported module
  on batch sizes the trace did not see; any mismatch, or any error, keeps the exported module
  (logged). Only models whose inputs are fixed apart from the batch dimension are traced: others
  cannot be checked.
* ``optimize="onednn"``: the frozen trace, then ``torch.jit.optimize_for_inference``, which
  runs convolutions (and, where it pays, linear layers) through oneDNN (MKLDNN) with weights
  prepacked once, and fuses what it can. Checked against the exported module like the trace;
  a mismatch or an error keeps the frozen trace.
* ``optimize="auto"`` on CPU (the default): both, and the faster one runs. Each is timed at load
  (alternating calls, the best of ``MEASURE_ROUNDS``) at one row and at the batch size the
  batcher forms (the ``BatchPolicy``'s ``max_batch_size``, halved while one call takes over
  ``MEASURE_CALL_S``); the oneDNN graph is kept when it needs at most ``ONEDNN_KEEP`` of the
  trace's time (the geometric mean over the two sizes). On the benchmark CNN it takes 0.72-0.84
  of the time; on the tiny MLP it is a near-tie (0.93-1.11), so either may run, from one load to
  the next.
* ``optimize="cudagraph"`` (the CUDA default through ``"auto"`` when the ``BatchPolicy`` has
  preferred batch sizes): the traced graph (or the exported module) is captured as one CUDA
  graph per preferred batch size; a batch is padded up to the next preferred size and replayed:
  one launch per batch instead of one per kernel.
* ``optimize="compile"``: ``torch.compile`` (inductor), compiled at each preferred batch size at
  load, batches padded to them so no request triggers a recompile. Slow to load; opt-in.
* ``optimize="none"``: the exported module as it is.

``device="cuda"``: weights move to the GPU once; each call copies the inputs into pinned host
memory and to the device without blocking, optionally casts floating inputs and weights to
``dtype`` (``bf16``/``fp16``), runs, and brings the outputs back as the manifest's datatypes.
CPU stays the default and what the tests here exercise; the GPU path is measured by
``loadtests/gpu_bench.py`` on a machine that has one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch

from kloop.artifact import Manifest
from serving.core.batching import BatchPolicy

log = logging.getLogger(__name__)

# What ``RuntimeOptions.optimize`` asks for (see the module docstring), and what then runs.
Optimize = Literal["auto", "trace", "onednn", "cudagraph", "compile", "none"]
Strategy = Literal["trace", "onednn", "cudagraph", "compile", "none"]
OPTIMIZE_CHOICES: tuple[Optimize, ...] = get_args(Optimize)
# Reduced precisions a GPU may run floating tensors in (``RuntimeOptions.dtype``).
ReducedDtype = Literal["bf16", "fp16"]
DTYPE_CHOICES: tuple[ReducedDtype, ...] = get_args(ReducedDtype)
DTYPES: dict[ReducedDtype, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The kinds of device a model runs on; a device is one of them, or "cuda:N" for GPU N.
DeviceKind = Literal["cpu", "cuda"]
DEVICE_KINDS: tuple[DeviceKind, ...] = get_args(DeviceKind)
_TORCH_OF = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8, "INT16": torch.int16,
    "INT32": torch.int32, "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32,
    "FP64": torch.float64, "BF16": torch.bfloat16, "UINT16": torch.uint16,
    "UINT32": torch.uint32, "UINT64": torch.uint64,
}
# torch's unannotated corners this module uses, typed once here.
_cuda_stream: Callable[[torch.device], torch.cuda.Stream] = torch.cuda.Stream
_jit_trace: Callable[..., torch.jit.ScriptModule] = torch.jit.trace
# torch.jit imports it without listing it in __all__, so it is not exported to a type checker.
_TracerWarning: type[Warning] = torch.jit.TracerWarning  # type: ignore[attr-defined]

CHECK_BATCHES = (1, 3)  # batch sizes an optimised graph must agree on (the trace uses 2)
MEASURE_ROUNDS = 3  # "auto" on CPU: timed calls per candidate graph and batch size
MEASURE_CALL_S = 0.25  # the measured batch is halved until one call takes at most this
ONEDNN_KEEP = 0.95  # the oneDNN graph runs when it needs at most this share of the trace's time


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How models run; validated at construction (``serving.cli`` builds one from its flags,
    ``serving.app.ServerConfig`` holds it). The batch sizes a graph is built or timed for are
    the batcher's: ``prepare`` takes them from the server's ``BatchPolicy``."""

    # A DeviceKind, or "cuda:N": torch's own device string, so not a Literal.
    device: str = "cpu"
    dtype: ReducedDtype | None = None  # None: as exported; else floating tensors cast (GPU)
    optimize: Optimize = "auto"  # see the module docstring

    def __post_init__(self) -> None:
        if self.optimize not in OPTIMIZE_CHOICES:
            raise ValueError(f"optimize must be one of {OPTIMIZE_CHOICES}, got {self.optimize!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or unset, got {self.dtype!r}")
        if not (self.device in DEVICE_KINDS or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.optimize == "cudagraph" and self.device == "cpu":
            raise ValueError("CUDA graphs need a CUDA device")
        if self.optimize == "onednn" and self.device != "cpu":
            raise ValueError("oneDNN (optimize_for_inference) graphs are for the CPU")
        if self.dtype is not None and self.device == "cpu":
            raise ValueError("a reduced dtype is for GPUs (CPU bf16/fp16 kernels are slower)")

    @property
    def cuda(self) -> bool:
        return self.device != "cpu"

    def strategy(self, manifest: Manifest, batching: BatchPolicy) -> Strategy:
        """What ``prepare`` will try for this model, batched as ``batching`` says (it falls
        back to "none" on a failure). "cudagraph" and "compile" build a graph per preferred
        batch size, and every batch is padded up to one of them."""
        preferred = batching.preferred_batch_sizes
        wanted: Strategy
        if self.optimize == "auto":
            wanted = "cudagraph" if self.cuda and preferred else "trace"
        else:
            wanted = self.optimize
        if wanted in ("cudagraph", "compile") and not (
                preferred and _batch_only_dynamic(manifest)):
            log.warning("%s v%s: %s needs preferred batch sizes and inputs fixed apart from "
                        "the batch; tracing instead", manifest.name, manifest.version, wanted)
            wanted = "trace"
        return wanted


class ModelRunner:
    """A loaded program ready to run: called with one CPU tensor per manifest input (the batch
    first), returns the model's outputs as CPU tensors. Thread-safe for concurrent calls on CPU;
    on a GPU each thread uses its own stream."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        options: RuntimeOptions,
        strategy: Strategy,
        pad_to: Sequence[int] = (),
        output_dtypes: Sequence[torch.dtype | None] = (),
    ) -> None:
        self._fn = fn
        self.options = options
        self.strategy = strategy  # what runs
        self.pad_to = tuple(sorted(pad_to))
        self._device = torch.device(options.device)
        self._cast = DTYPES.get(options.dtype) if options.dtype else None
        self._output_dtypes = tuple(output_dtypes)
        self._local = threading.local()
        self._graphs: dict[int, _CudaGraph] = {}

    @property
    def max_rows(self) -> int | None:
        """The most rows one call takes (padding needs a size to pad to), or None."""
        return self.pad_to[-1] if self.pad_to else None

    def __call__(self, *inputs: torch.Tensor) -> Any:
        rows = inputs[0].shape[0] if inputs and inputs[0].dim() else None
        padded = self._padded_rows(rows)
        if padded is not None and rows is not None and padded != rows:
            inputs = tuple(_pad(t, padded) for t in inputs)
        if not self.options.cuda:
            result = self._fn(*inputs)
        else:
            result = self._run_cuda(inputs)
        if padded is not None and rows is not None and padded != rows:
            result = _slice(result, rows)
        return result

    def _padded_rows(self, rows: int | None) -> int | None:
        if rows is None or not self.pad_to:
            return None
        for size in self.pad_to:
            if size >= rows:
                return size
        return None  # larger than every graph: runs as it is (the batcher prevents this)

    def _run_cuda(self, inputs: Sequence[torch.Tensor]) -> Any:
        graph = self._graphs.get(inputs[0].shape[0]) if self._graphs and inputs else None
        if graph is not None:
            return graph.replay(inputs)
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = _cuda_stream(self._device)
        with torch.cuda.stream(stream):
            moved = [self._to_device(t) for t in inputs]
            result = self._fn(*moved)
            outputs = result if isinstance(result, (tuple, list)) else (result,)
            back = [self._as_declared(i, out).to("cpu", non_blocking=True)
                    for i, out in enumerate(outputs)]
            stream.synchronize()
        return tuple(back) if isinstance(result, (tuple, list)) else back[0]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host tensor -> device through a pinned buffer this thread reuses (one per shape)."""
        pinned: dict[tuple[Any, ...], torch.Tensor] = self._local.__dict__.setdefault("pinned", {})
        key = (tuple(t.shape), t.dtype)
        buf = pinned.get(key)
        if buf is None:
            buf = pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t)
        d = buf.to(self._device, non_blocking=True)
        return d.to(self._cast) if self._cast is not None and d.is_floating_point() else d

    def _as_declared(self, i: int, out: torch.Tensor) -> torch.Tensor:
        want = self._output_dtypes[i] if i < len(self._output_dtypes) else None
        return out.to(want) if want is not None and out.dtype != want else out

    def capture_graphs(self, manifest: Manifest) -> None:
        """Record one CUDA graph per padding size (after warm-up runs on a side stream)."""
        for rows in self.pad_to:
            self._graphs[rows] = _CudaGraph(self, _examples(manifest, rows))


class _CudaGraph:
    """One captured forward pass at a fixed batch size: static device inputs and outputs;
    a call copies in, replays, copies out. One call at a time (the buffers are shared)."""

    def __init__(self, runner: ModelRunner, example: Sequence[torch.Tensor]) -> None:
        self._lock = threading.Lock()
        self._runner = runner
        self._stream = _cuda_stream(runner._device)
        # inference_mode: no autograd state recorded into the graph (the exported module's
        # parameters still require grad when tracing fell back to it).
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            self._inputs = [runner._to_device(t).clone() for t in example]
            for _ in range(3):  # warm-up outside the graph (lazy init, autotuning)
                runner._fn(*self._inputs)
            self._stream.synchronize()
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, stream=self._stream):
                result = runner._fn(*self._inputs)
                self._tuple = isinstance(result, (tuple, list))
                outs = result if self._tuple else (result,)
                # Cast to the declared dtypes inside the capture: a cast made after it would be
                # a copy taken once, never refreshed by a replay.
                self._outputs = [runner._as_declared(i, o) for i, o in enumerate(outs)]
        self._host = [torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in self._outputs]

    def replay(self, inputs: Sequence[torch.Tensor]) -> Any:
        with self._lock, torch.cuda.stream(self._stream):
            for static, t in zip(self._inputs, inputs, strict=True):
                static.copy_(self._runner._to_device(t), non_blocking=True)
            self._graph.replay()
            for host, out in zip(self._host, self._outputs, strict=True):
                host.copy_(out, non_blocking=True)
            self._stream.synchronize()
            back = [h.clone() for h in self._host]
        return tuple(back) if self._tuple else back[0]


def prepare(module: torch.nn.Module, manifest: Manifest, options: RuntimeOptions,
            batching: BatchPolicy | None = None) -> ModelRunner:
    """The ``ModelRunner`` for an exported module, optimised as ``options`` say for the batches
    ``batching`` forms (default: ``BatchPolicy()``): graphs are timed at its
    ``max_batch_size`` and captured or compiled at its preferred sizes."""
    batching = batching or BatchPolicy()
    strategy = options.strategy(manifest, batching)
    output_dtypes = tuple(_TORCH_OF.get(s.datatype) for s in manifest.outputs)
    if options.cuda:
        module = module.to(options.device)
        if options.dtype:
            module = module.to(DTYPES[options.dtype])
    label = f"{manifest.name} v{manifest.version}"
    fn: Callable[..., Any] = module
    if strategy in ("trace", "onednn", "cudagraph"):
        traced = _trace(module, manifest, options, label)
        if traced is None:
            if strategy != "cudagraph":
                strategy = "none"
        elif strategy == "cudagraph":
            fn = traced.frozen
        else:
            fn, strategy = traced.frozen, "trace"
            if options.optimize in ("auto", "onednn") and not options.cuda:
                optimized = _onednn(module, traced.unfrozen, manifest, options, label)
                if optimized is not None and (options.optimize == "onednn" or _keep_onednn(
                        {"trace": traced.frozen, "onednn": optimized}, manifest,
                        batching.max_batch_size, label)):
                    fn, strategy = optimized, "onednn"
    elif strategy == "compile":
        fn = torch.compile(module, dynamic=False)
    pad_to = batching.preferred_batch_sizes if strategy in ("cudagraph", "compile") else ()
    runner = ModelRunner(fn, options=options, strategy=strategy, pad_to=pad_to,
                         output_dtypes=output_dtypes)
    if strategy == "cudagraph":
        runner.capture_graphs(manifest)
    elif strategy == "compile":
        with torch.inference_mode():
            for size in pad_to:  # compile every shape now, not on a client's request
                runner(*_examples(manifest, size))
    log.info("%s runs as %s on %s%s%s", label, strategy, options.device,
             f" ({options.dtype})" if options.dtype else "",
             f", batches padded to {list(pad_to)}" if pad_to else "")
    return runner


def _batch_only_dynamic(manifest: Manifest) -> bool:
    return all(
        len(s.shape) >= 1 and s.shape[0] == -1 and all(d >= 0 for d in s.shape[1:])
        and s.datatype in _TORCH_OF
        for s in manifest.inputs
    )


def _examples(manifest: Manifest, rows: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of ``rows`` rows for every manifest input: normal noise for floating types, small
    non-negative integers otherwise (valid as indices and as counts)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in manifest.inputs:
        shape = (rows, *spec.shape[1:])
        dtype = _TORCH_OF[spec.datatype]
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.zeros(shape, dtype=dtype))
        else:
            out.append(torch.randint(0, 2, shape, generator=gen).to(dtype))
    return tuple(out)


def _on_device(tensors: Sequence[torch.Tensor], options: RuntimeOptions) -> tuple[torch.Tensor, ...]:
    if not options.cuda:
        return tuple(tensors)
    cast = DTYPES.get(options.dtype) if options.dtype else None
    moved = (t.to(options.device) for t in tensors)
    return tuple(t.to(cast) if cast is not None and t.is_floating_point() else t for t in moved)


@dataclasses.dataclass(frozen=True)
class _Traced:
    unfrozen: torch.jit.ScriptModule  # never called: what further graph passes start from
    frozen: torch.jit.ScriptModule  # checked against the exported module


def _trace(
    module: torch.nn.Module, manifest: Manifest, options: RuntimeOptions, label: str
) -> _Traced | None:
    """A frozen TorchScript trace of ``module`` that agrees with it, or None (see the module
    docstring for why and when)."""
    if not _batch_only_dynamic(manifest):
        log.info("%s: inputs have dynamic dims besides the batch; not traced", label)
        return None
    try:
        # The tracer warns about every shape it records as a constant; the check below is what
        # decides whether that mattered.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", _TracerWarning)
            traced = _jit_trace(module, _on_device(_examples(manifest, 2), options),
                                check_trace=False)
            frozen = torch.jit.freeze(traced.eval())
        rows = _disagreement(module, frozen, manifest, options)
        if rows is not None:
            log.warning("%s: the traced graph disagrees with the exported module at batch %d; "
                        "running the exported module", label, rows)
            return None
    except Exception as e:  # noqa: BLE001  (an optimisation never fails a load; logged)
        log.warning("%s: could not trace (%s: %s); running the exported module",
                    label, type(e).__name__, e)
        return None
    return _Traced(traced, frozen)


def _disagreement(module: torch.nn.Module, candidate: Callable[..., Any], manifest: Manifest,
                  options: RuntimeOptions) -> int | None:
    """The first of CHECK_BATCHES at which ``candidate`` answers differently from the exported
    module, or None when it agrees at all of them."""
    with torch.inference_mode():
        for rows in CHECK_BATCHES:
            example = _on_device(_examples(manifest, rows, seed=rows), options)
            if not _agree(module(*example), candidate(*example)):
                return rows
    return None


def _onednn(
    module: torch.nn.Module, traced: torch.jit.ScriptModule, manifest: Manifest,
    options: RuntimeOptions, label: str,
) -> Callable[..., Any] | None:
    """``torch.jit.optimize_for_inference`` of the trace (which freezes a copy of it first)
    when it agrees with the exported module, else None (logged).

    It starts from the trace, which has never run, not from the frozen module, which has (the
    check in ``_trace``): on torch 2.13 a copy made from a frozen module after its first calls
    kept running the graph compiled before the pass (the benchmark CNN: same answers, none of
    the speed)."""
    try:
        with torch.inference_mode(False), torch.no_grad():
            optimized = torch.jit.optimize_for_inference(traced.eval())
        rows = _disagreement(module, optimized, manifest, options)
        if rows is not None:
            log.warning("%s: the oneDNN graph disagrees with the exported module at batch %d; "
                        "running the frozen trace", label, rows)
            return None
    except Exception as e:  # noqa: BLE001  (an optimisation never fails a load; logged)
        log.warning("%s: could not build a oneDNN graph (%s: %s); running the frozen trace",
                    label, type(e).__name__, e)
        return None
    return optimized


def _keep_onednn(
    candidates: dict[str, Callable[..., Any]], manifest: Manifest, max_rows: int, label: str,
    clock: Callable[[], float] = time.perf_counter,
) -> bool:
    """Whether "onednn" is fast enough against "trace" to run instead (``ONEDNN_KEEP``)."""
    share, rows = relative_time(candidates, manifest, max_rows, clock)
    keep = share["onednn"] <= ONEDNN_KEEP
    log.info("%s: the oneDNN graph takes %.2f of the frozen trace's time (batches of 1 and %d "
             "rows); running %s", label, share["onednn"], rows, "oneDNN" if keep else "the trace")
    return keep


def relative_time(
    candidates: dict[str, Callable[..., Any]], manifest: Manifest, max_rows: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, float], int]:
    """Each candidate's time per call as a share of the first one's (the geometric mean over a
    batch of one row and one of ``rows``), and ``rows``: ``max_rows``, halved while a call of
    the first candidate takes over ``MEASURE_CALL_S``. Calls alternate between candidates and
    each keeps its best of ``MEASURE_ROUNDS``, so a busy spell on the box hits them alike."""
    first = next(iter(candidates.values()))
    best: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        rows = max_rows
        while True:  # the probe also warms the first candidate up
            start = clock()
            first(*_examples(manifest, rows))
            if rows == 1 or clock() - start <= MEASURE_CALL_S:
                break
            rows = max(1, rows // 2)
        examples = {r: _examples(manifest, r, seed=r) for r in sorted({1, rows})}
        for fn in candidates.values():  # warm-up: first calls allocate and reorder weights
            for example in examples.values():
                fn(*example)
        for _ in range(MEASURE_ROUNDS):
            for name, fn in candidates.items():
                for r, example in examples.items():
                    start = clock()
                    fn(*example)
                    elapsed = clock() - start
                    best[name, r] = min(best.get((name, r), math.inf), elapsed)
    base = next(iter(candidates))
    share = {
        name: math.prod(best[name, r] / max(best[base, r], 1e-12) for r in examples)
        ** (1 / len(examples))
        for name in candidates
    }
    return share, rows


def _agree(a: Any, b: Any) -> bool:
    xs = a if isinstance(a, (tuple, list)) else (a,)
    ys = b if isinstance(b, (tuple, list)) else (b,)
    if len(xs) != len(ys):
        return False
    for x, y in zip(xs, ys, strict=True):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return False
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            if not torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-4):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    extra = rows - t.shape[0]
    return torch.cat([t, t[:1].expand(extra, *t.shape[1:])]) if extra > 0 else t


def _slice(result: Any, rows: int) -> Any:
    if isinstance(result, (tuple, list)):
        return type(result)(r[:rows] for r in result)
    return result[:rows]
