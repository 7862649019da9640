"""The engine core: the pipelines, the model cache and the step loop, in their own process.

The HTTP process (FastAPI/uvicorn) parses, validates, admits requests against the queue
bound, encodes images and serves /metrics. The engine process owns everything that touches
the model: the `ModelCache` (single-flight loads, LRU) and its loader (`preparing`: load,
LoRA, compile policy, warm-up), the scheduler and the step batches, and the start-up state
/readyz reports (`readiness`); the loop (`core`) wires them and moves the messages.
One engine per device; scale out with more pods.

    HTTP process                                   engine process (spawn; main thread)
    ------------                                   -----------------------------------
    route -> ServiceState.run                      loop: read pipe -> finished loads ->
      EngineClient.submit ---- Submit/Cancel --->        admit at step boundary ->
      (sender thread)          Load/Stop/Query           one step -> send events
      reader thread <---- [Started, Finished, ...  <---
      -> asyncio futures       Metrics ops, Status]

Choices, and what they follow:

- A process per device whose *main thread* runs the pipelines (vLLM V1's `EngineCoreProc`
  busy loop; LitServe's inference worker processes; TGI's Python shards). Measured here: the
  same batch-4 pipeline call is ~20% slower from a non-main thread, and in-process the HTTP
  work shares the cores and the GIL with it. The context is "spawn": forking a process that
  has imported torch (and started its thread pools) is unsafe.
- Nothing else in the engine keeps a thread that ran torch: loads run on a thread that exits
  afterwards (`engine.cache`). Profiled under load, a live load thread (its OpenMP team
  still alive) left one of the two intra-op threads idle half the time and made the step loop
  25-50% slower; with it gone both threads run at 100% and the engine is ~90% transformer
  forward (py-spy, concurrency 16).
- The scheduler lives in the engine (vLLM V1 puts it in the engine core; TGI's router owns
  batching but talks to shards over gRPC). Here the batch composition depends on the loaded
  pipeline (its defaults, whether it can step), so it sits next to the pipeline, and admission
  happens at the step boundary without a round trip.
- Step-level continuous batching (TGI's router and vLLM's scheduler at token level): a request
  joins a running batch of its kind at the next step and leaves after its own last step, so
  no batching window is needed (a lone request starts at once). `QDS_MAX_BATCH=auto` is 8
  per lane on CPU (docs/benchmarks/batch-size.md) and 4 on a GPU (unmeasured). Requests that
  finish at the same step share one VAE decode.
  On a CPU the limit is shared by `QDS_ENGINE_LANES` batches (auto 2) that step at the same
  time on threads of their own, one torch thread each (`lanes`): at the demo model's sizes two
  batches of 4 serve more than one of 8 on both threads. A batch takes 4 images before the
  next lane opens (a batch of 4 on both threads beat two of 2 at concurrency 4).
- A compiled denoiser by default where measured to pay (`engine.compiling`,
  `QDS_COMPILE=auto`: CPU with a C++ compiler, backends whose `compiles_by_default` holds),
  the whole denoiser as one graph on a CPU (`QDS_COMPILE_SCOPE=auto`; compiled blocks served
  fewer images per second there, side by side in docs/benchmarks/compile-serving*.md). The
  warm-up runs the step loop itself (1 and 2 images, the main thread and a lane, the
  batches' grad mode), so dynamo's guards (grad mode, thread count, batch size) are met
  before /readyz turns 200.
- Batches run under `torch.inference_mode` where the backend's kernels allow it
  (`QuantBackend.allows_inference_mode`; a lone request ~5% faster on the demo model).
  Pipelines that cannot step (`pipelines.stepping.supports_stepping` false) run whole
  `generate_batch` calls, batched from whatever is queued when the previous call ends.
- Transport: one `multiprocessing` pipe, pickled dataclasses (`messages`), one list of events
  per loop iteration. vLLM uses ZeroMQ + msgpack with I/O threads to overlap serialisation
  with the GPU; at one message per request and per step that buys nothing here. Images travel
  as raw RGB pixels in the pipe (a PIL image pickles as its bytes). Measured on this 2-core
  machine, pipe vs shared memory (create, copy in, copy out, unlink), median of 30:
  1024x1024 RGB 1.9 ms vs 3.6 ms, four of them 16 ms vs 26 ms, 512x512 0.2 ms vs 0.8 ms.
  Shared memory would pay only with a zero-copy consumer, and PNG encoding (56 ms at
  1024x1024) dominates either way, so pipes for every size. Encoding stays in the HTTP
  process (in a thread for large images), overlapping the engine's next step.
- The HTTP side never blocks on the pipe: sends go through a sender thread, events come in on
  a reader thread and are handed to the event loop (LitServe's response-queue thread does the
  same).
- Faults: the engine's death reads as end-of-file on the pipe; every waiting request gets a
  503 naming the cause (signal or exit code), /readyz says so, and a new engine is started
  (vLLM fails the whole server with `EngineDeadError`; one pod per GPU here, so restarting is
  cheaper than a pod restart and Kubernetes still sees readiness drop). A hung engine (alive,
  stuck in a step) is the same case once the HTTP side's watchdog kills it: no word from the
  engine for QDS_ENGINE_STALL_TIMEOUT while requests run (it sends `Alive` each telemetry
  period while it has work). Client disconnects and
  deadlines send `Cancel`; the engine drops the request before the next step
  (`qds_cancelled_total{reason}`). Out-of-memory fails that batch with a 503 and frees its
  memory after the exception handler. Shutdown: `Stop` -> queued requests get 503
  `shutting_down`, running batches finish, the process exits (killed after the timeout).
- Metrics: the engine records metric operations and ships them with its events; the HTTP
  process applies them to its registry (`telemetry` says why not multiprocess mode).

`QDS_ENGINE=inline` runs the same loop on a thread of the HTTP process, for tests (hooks that
cannot be pickled) and debugging; production is `process`.
"""
