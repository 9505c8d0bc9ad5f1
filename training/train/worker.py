"""One training rank as a small object, and the Ray Train function that drives it.

``TrainWorker`` owns the DeepSpeed engine of one rank: ``build``, ``restore``, ``step``,
``validate``, ``save``, ``close``. It needs a torch.distributed process group and nothing else:
Ray Train makes one (gloo or NCCL), ``init_distributed`` makes one for a plain process or a
torchrun rank. Ray is imported only inside ``train_loop_per_worker``, so this module runs on a
machine without Ray (``training.train.local``).

``run_steps`` is the training loop both drivers share: rows in the data order of
``training.data.order``, metrics, validation, a checkpoint callback. Everything arrives
through arguments (Ray: ``train_loop_config``, STYLE.md 11); nothing is read from module globals.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.storage import storage_errors
from training.data.collate import IGNORE_INDEX, collate_blocks
from training.data.order import (
    epoch_of_step,
    plans_until,
    rank_micro_batches,
    resume_point,
    stream_paths,
)
from training.model import Block, Transformer, build_model
from training.model.flops import train_step_flops
from training.train.checkpoint import DS_TAG, DataCursor, TrainState
from training.train.config import TrainConfig
from training.train.context import WorkerContext
from training.train.finetune import load_init_weights
from training.train.integrity import no_code_execution, require_intact, write_checksums
from training.train.metrics import MetricsWriter, StepMetrics, format_step, peak_flops
from training.train.optimizer import build_optimizer


def deepspeed_config(cfg: TrainConfig, world: int, bf16: bool) -> dict[str, Any]:
    ds = cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": ds.micro_batch_rows,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": ds.micro_batch_rows * ds.grad_accum * world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": bf16},
        # Our client torch AdamW stays in charge (no op compilation, see STACK.md).
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def skip_deepspeed_shm_build() -> None:
    """Tell DeepSpeed not to JIT-compile its CPU shared-memory all-reduce op.

    DeepSpeed's CPU backend builds that op on every ``init_distributed``, yet only
    tensor-parallel *inference* (``inference_all_reduce``) uses it; training never does. The
    build takes minutes on a small machine, starts over for every virtualenv path, and guards
    itself with a bare lock file (torch's ``FileBaton``): a worker killed mid-build leaves the
    lock behind, and every later training start then waits on it forever. Marking the op
    incompatible is the switch DeepSpeed itself reads before it builds.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def init_distributed(gpu: bool = False) -> tuple[int, int]:
    """The torch.distributed process group of this process; returns (rank, world size).

    Under torchrun the ranks come from its environment; a plain process becomes rank 0 of 1 (on
    a free local port; only LOCAL_RANK is set, which DeepSpeed's engine requires). NCCL with ``gpu``, gloo otherwise,
    through ``deepspeed.init_distributed`` (its accelerator from ``DS_ACCELERATOR``, set here
    when unset). A no-op where a group already exists (Ray Train makes its own).
    """
    if not dist.is_initialized():
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
        import deepspeed

        skip_deepspeed_shm_build()
        backend = "nccl" if gpu else "gloo"
        if "RANK" in os.environ:  # torchrun and the like
            deepspeed.init_distributed(backend, auto_mpi_discovery=False, verbose=False)
        else:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it
            deepspeed.init_distributed(
                backend,
                auto_mpi_discovery=False,
                verbose=False,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
            )
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    """Destroy the process group that :func:`init_distributed` created.

    Through DeepSpeed's own ``destroy_process_group``: DeepSpeed caches a clone of the world
    group, and a stale clone makes the next engine in this process fail ("Group ... is not
    registered") once a fresh group exists; DeepSpeed's teardown releases it."""
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()


# -- torch.compile -----------------------------------------------------------------------------


class EagerPattern:
    """What a compiled block sees of its attention pattern: both calls run eagerly.

    ``Block.forward`` calls ``attention.rotate`` (RoPE) and ``attention(...)`` (the pattern).
    Traced, the pattern's routing (``training.model.attention``: one gather and one SDPA call
    per group of equal-length runs, groups planned on the host per batch) makes every batch
    with another number of groups, every pattern type and every first layer of a stage (whose
    RoPE tables are not cached yet) a new graph; measured on a tiny GPTHF, dynamo hit its
    recompile limit (8) within two batches and fell back to eager for good. Behind this proxy
    each call is a graph break: a block compiles into three graphs (norm + QKV projection;
    the unbind and, in a pruned layer, the interaction projection; output projection + residual
    + MLP) whose inputs are plain tensors, and the routing and RoPE run as in eager mode.
    """

    __slots__ = ("pattern",)

    def __init__(self, pattern: Any) -> None:
        self.pattern = pattern

    @torch.compiler.disable
    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.pattern.rotate(x)

    @torch.compiler.disable
    def __call__(self, *args: Any) -> torch.Tensor:
        return self.pattern(*args)


def compile_blocks(model: Transformer) -> None:
    """``run.compile``: every block's forward through one ``torch.compile`` of ``Block.forward``,
    in place (parameters, state_dict keys and hooks unchanged).

    Compiled with ``dynamic=True``: T changes with every batch, so its graphs are symbolic in T
    (and B) from the first compile. Two dynamo settings, only while a block traces: integer
    attributes of a module (``Block.layer``, passed to the pattern) stay unspecialised, or each
    layer would be its own graph; and no duck sizing, which would otherwise equate the batch
    size with a fixed dimension of the same value (the 3 of q, k, v; the head count) and
    recompile when the batch changes. What remains per graph: whether the block has a pruning
    gate (GPTHF: encoder vs body), grad mode (training vs validation), and B == 1 (dynamo
    specialises sizes 0 and 1): tests/test_train_compile.py counts the frames compiled.
    """
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as shape_config

    compiled: Callable[..., torch.Tensor] = torch.compile(Block.forward, dynamic=True)

    @dynamo_config.patch(allow_unspec_int_on_nn_module=True)
    @shape_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]
    def forward(block: Block, x: torch.Tensor, attention: Any) -> torch.Tensor:
        return compiled(block, x, EagerPattern(attention))

    for block in model.blocks:
        # A bound method (not a closure over the block): a deepcopy of the model rebinds it.
        block.forward = types.MethodType(forward, block)


# -- determinism --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Determinism:
    """torch's process-wide determinism settings, to put back."""

    algorithms: bool
    warn_only: bool
    cudnn_benchmark: bool
    cudnn_deterministic: bool

    @classmethod
    def current(cls) -> _Determinism:
        return cls(
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic,
        )

    def apply(self) -> None:
        torch.use_deterministic_algorithms(self.algorithms, warn_only=self.warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.deterministic = self.cudnn_deterministic


DETERMINISTIC = _Determinism(
    algorithms=True, warn_only=True, cudnn_benchmark=False, cudnn_deterministic=True
)


def make_deterministic(gpu: bool) -> _Determinism:
    """``run.deterministic``: deterministic kernels from here on; returns the settings before.

    Warn-only: an op without a deterministic kernel warns instead of failing the run. cuBLAS
    reads CUBLAS_WORKSPACE_CONFIG when it creates its handle, i.e. at this process's first
    matmul on the device: call this before any CUDA work (a value already set is kept).
    """
    before = _Determinism.current()
    if gpu:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    DETERMINISTIC.apply()
    return before


def _documents(rows: pa.Table) -> list[list[int]]:
    """Sentence lengths of each (row-local) document: what the FLOPs model needs."""
    docs = []
    for lengths, doc_index in zip(
        rows.column("sentence_lengths").to_pylist(),
        rows.column("document_index").to_pylist(),
        strict=True,
    ):
        current: list[int] = []
        last = None
        for n, d in zip(lengths, doc_index, strict=True):
            if d != last and current:
                docs.append(current)
                current = []
            current.append(n)
            last = d
        if current:
            docs.append(current)
    return docs


def _all_sum(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    """Sums over ranks, several values in one collective (and one read on the host)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TrainWorker:
    """One rank: the model under the run's seed, client AdamW + schedule, the DeepSpeed engine.

    ``global_step`` and ``tokens_seen`` count what this run has done (``restore`` sets them).
    Every method that touches the engine is a collective: call it on every rank.
    """

    def __init__(self, cfg: TrainConfig, ctx: WorkerContext, *, local_rank: int = 0) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "TrainWorker needs a torch.distributed process group: call "
                "training.train.worker.init_distributed() first, or run under Ray Train or torchrun"
            )
        self.cfg, self.ctx = cfg, ctx
        # First, before any CUDA work (cuBLAS reads its workspace setting once); undone by close.
        self._determinism_before = (
            make_deterministic(cfg.run.gpu) if cfg.run.deterministic else None
        )
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(f"cuda:{local_rank}") if cfg.run.gpu else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        ds = cfg.deepspeed
        self.bf16 = ds.bf16 if ds.bf16 is not None else self.device.type == "cuda"
        self.micro_rows, self.grad_accum = ds.micro_batch_rows, ds.grad_accum
        self.rows_per_step = self.micro_rows * self.grad_accum
        total = cfg.optim.total_steps
        self.end_step = min(total, cfg.run.max_steps) if cfg.run.max_steps is not None else total
        self.plans = plans_until(
            list(ctx.shards), self.world, self.rows_per_step, cfg.data.shuffle_seed, total
        )
        self.global_step = 0
        self.tokens_seen = 0
        self.num_parameters = 0
        self.timings: dict[str, float] = {"started": time.time(), "build_s": 0.0, "restore_s": 0.0}
        """When this rank started (epoch seconds: the driver compares it with its own clock) and
        the seconds ``build`` and ``restore`` took: a run's fixed cost, in ``run_steps``'s final
        record."""
        self._engine: Any = None
        self._scheduler: Any = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            raise RuntimeError("TrainWorker.build() first")
        return self._engine

    # -- life cycle ------------------------------------------------------------------------------

    def build(self) -> TrainWorker:
        import deepspeed

        t0 = time.perf_counter()
        skip_deepspeed_shm_build()  # deepspeed.initialize starts DeepSpeed's comm backend
        torch.manual_seed(self.cfg.run.seed)
        model = build_model(self.ctx.model_config)
        if self.cfg.model.init_from:  # a resume then loads the checkpoint over these weights
            load_init_weights(model, self.cfg.model.init_from, self.cfg.storage)
        self.num_parameters = model.num_parameters()
        if self.cfg.run.compile:  # before DeepSpeed wraps it; compiles lazily, at the first step
            compile_blocks(model)
        optimizer, self._scheduler = build_optimizer(
            model, self.cfg.optim, self.cfg.pruning.lr_scale
        )
        self._engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=self._scheduler,
            config=deepspeed_config(self.cfg, self.world, self.bf16),
        )
        self.timings["build_s"] = time.perf_counter() - t0
        return self

    def restore(self, checkpoint_dir: str | Path) -> TrainState:
        """Continue from a local checkpoint directory holding every rank's files."""
        t0 = time.perf_counter()
        state = TrainState.load(checkpoint_dir)
        state.check_resumable(
            self.ctx.model_config, self.ctx.schedule_hash, self.world, self.ctx.tokenizer_sha256
        )
        # Verified again here, on the copy this rank loads: the storage is shared.
        require_intact(str(checkpoint_dir), state.world_size)
        with no_code_execution(str(checkpoint_dir)):
            self.engine.load_checkpoint(str(checkpoint_dir), tag=DS_TAG)
            rng = Path(checkpoint_dir, f"rng_rank{self.rank}.pt")
            if rng.exists():
                torch.set_rng_state(torch.load(rng, weights_only=True))
        self.global_step, self.tokens_seen = state.step, state.tokens_seen
        self.timings["restore_s"] = time.perf_counter() - t0
        return state

    def state(self) -> TrainState:
        """Where the run stands now (what ``save`` records)."""
        cfg, ctx = self.cfg, self.ctx
        return TrainState(
            step=self.global_step,
            tokens_seen=self.tokens_seen,
            data_cursor=DataCursor(
                global_step=self.global_step,
                epoch=epoch_of_step(self.plans, self.global_step),
                rows_per_step=self.rows_per_step * self.world,
            ),
            seed=cfg.run.seed,
            shuffle_seed=cfg.data.shuffle_seed,
            world_size=self.world,
            schedule_hash=ctx.schedule_hash,
            tokenizer_sha256=ctx.tokenizer_sha256,
            manifest_version=ctx.manifest_version,
            model_config=ctx.model_config,
            zero_stage=cfg.deepspeed.zero_stage,
        )

    def save(self, directory: str | Path, state: TrainState | None = None) -> TrainState:
        """This rank's part of a checkpoint into a local directory of its own (rank 0 adds the
        configs and the trainer state), then the checksums of what it wrote."""
        state = state or self.state()
        self.engine.save_checkpoint(str(directory), tag=DS_TAG)
        torch.save(torch.get_rng_state(), Path(directory, f"rng_rank{self.rank}.pt"))
        if self.rank == 0:
            mc = json.dumps(self.ctx.model_config.to_dict(), indent=1)
            Path(directory, "model_config.json").write_text(mc)
            tc = json.dumps(self.cfg.to_dict(redact=True), indent=1)
            Path(directory, "train_config.json").write_text(tc)
            state.write(directory)
        write_checksums(directory, self.rank)  # last: it lists everything this rank wrote
        return state

    def close(self) -> None:
        """Release the engine (the process group stays: whoever made it destroys it)."""
        if self._engine is not None:
            self._engine.destroy()
        self._engine = self._scheduler = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self._determinism_before is not None:
            self._determinism_before.apply()
            self._determinism_before = None

    def __enter__(self) -> TrainWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- data ------------------------------------------------------------------------------------

    def stream_uris(self) -> list[str]:
        """The shard files this rank reads, in order, from ``global_step`` on."""
        rp = resume_point(
            self.plans,
            self.rank,
            self.global_step,
            self.rows_per_step,
            self.cfg.data.shuffle_chunk_rows,
        )
        return [f"{self.ctx.data_root}/{p}" for p in stream_paths(self.plans, self.rank, rp)]

    def micro_batches(
        self, stream: Iterable[pa.Table | pa.RecordBatch]
    ) -> Iterator[tuple[int, list[pa.Table]]]:
        """(global step, this rank's micro-batches) from ``global_step`` on; ``stream`` is the
        rows of ``stream_uris()`` in order."""
        return rank_micro_batches(
            stream,
            self.plans,
            self.rank,
            self.global_step,
            micro_rows=self.micro_rows,
            grad_accum=self.grad_accum,
            chunk_rows=self.cfg.data.shuffle_chunk_rows,
            seed=self.cfg.data.shuffle_seed,
        )

    # -- training --------------------------------------------------------------------------------

    def step(self, micro_batches: Sequence[pa.Table]) -> StepMetrics:
        """One optimizer step over this rank's ``grad_accum`` micro-batches.

        The loss is the summed NLL of the global batch over its target count. Two collectives:
        one sum of (targets, tokens, FLOPs) before the forward (the loss scale needs the global
        target count), one of the NLL after.
        """
        if len(micro_batches) != self.grad_accum:
            raise ValueError(
                f"step() takes grad_accum={self.grad_accum} micro-batches, got {len(micro_batches)}"
            )
        engine, mc, world, accum = self.engine, self.ctx.model_config, self.world, self.grad_accum
        t0 = time.perf_counter()
        collated = [
            collate_blocks(m, pad_id=mc.pad_id, pad_to_multiple=self.cfg.data.pad_to_multiple)
            for m in micro_batches
        ]
        t1 = time.perf_counter()
        local_flops = sum(train_step_flops(mc, _documents(m)).total for m in micro_batches)
        global_targets, global_tokens, flops = _all_sum(
            [
                sum(b.num_targets for b in collated),
                sum(b.num_tokens for b in collated),
                local_flops,
            ],
            self.device,
        )
        lr = float(self._scheduler.get_last_lr()[0])  # the model's group (pruning: x lr_scale)
        pruning = self.cfg.pruning
        alpha = None
        if mc.prune:
            alpha = pruning.alpha_at(self.global_step, self.cfg.optim.total_steps)
            engine.module.set_prune_alpha(alpha)
        layers = mc.pruned_layers  # the same list on every rank: one collective
        n = len(layers)
        # (NLL, kept per pruned layer, gated pairs per pruned layer), summed on the device and
        # read once per step: a read per micro-batch (let alone per layer) would make the host
        # wait for each forward before it could queue the backward.
        sums = torch.zeros(1 + 2 * n, dtype=torch.float64, device=self.device)
        for b in collated:
            b = b.to(self.device)
            logits = engine(b.input_ids, b.sentence_ids, b.document_ids)
            nll = F.cross_entropy(
                logits.float().flatten(0, 1),
                b.labels.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            # DeepSpeed divides by grad_accum and averages over ranks: this makes the gradient
            # that of the summed NLL over the global batch divided by its target count.
            loss = nll * (world * accum) / global_targets
            record = engine.module.last_pruning
            if record is not None:
                # ... and this one lambda x the kept fraction, averaged over micro-batches.
                if pruning.sparsity:
                    loss = loss + pruning.sparsity * record.kept_fraction()
                sums[1:] += torch.stack(
                    [record.kept[i].detach().double() for i in layers]
                    + [record.pairs[i].double() for i in layers]
                )
            engine.backward(loss)
            engine.step()
            sums[0] += nll.detach().double()
        summed = _all_sum(sums, self.device)
        global_nll = summed[0]
        kept_global = dict(zip(layers, summed[1 : 1 + n], strict=True))
        pairs_global = dict(zip(layers, summed[1 + n :], strict=True))
        tokens = int(global_tokens)
        self.tokens_seen += tokens
        self.global_step += 1
        grad_norm = engine.get_global_grad_norm()
        return StepMetrics(
            step=self.global_step,
            loss=global_nll / global_targets,
            nll=global_nll,
            targets=int(global_targets),
            tokens=tokens,
            tokens_seen=self.tokens_seen,
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            flops=flops,
            collate_s=t1 - t0,
            compute_s=time.perf_counter() - t1,
            prune_alpha=alpha,
            kept={i: kept_global[i] / pairs_global[i] for i in layers if pairs_global[i]},
            kept_all=sum(kept_global.values()) / max(1.0, sum(pairs_global.values())),
        )

    def validate(self, val_rows: Sequence[dict[str, Any]]) -> float:
        """Mean NLL over a held-out sample; every rank scores all of it (ZeRO-3 needs all ranks
        in every forward), so no reduction is needed."""
        engine, pad_id, micro = self.engine, self.ctx.model_config.pad_id, self.micro_rows
        engine.eval()
        nll = targets = 0.0
        with torch.no_grad():
            for i in range(0, len(val_rows), micro):
                b = collate_blocks(list(val_rows[i : i + micro]), pad_id=pad_id).to(self.device)
                logits = engine(b.input_ids, b.sentence_ids, b.document_ids)
                nll += float(
                    F.cross_entropy(
                        logits.float().flatten(0, 1),
                        b.labels.flatten(),
                        ignore_index=IGNORE_INDEX,
                        reduction="sum",
                    )
                )
                targets += b.num_targets
        engine.train()
        return nll / max(targets, 1)

    def describe(self) -> str:
        mc, cfg = self.ctx.model_config, self.cfg
        threads = f" ({torch.get_num_threads()} torch threads)" if self.device.type == "cpu" else ""
        return (
            f"[train] {mc.arch} {self.num_parameters:,} params, {self.world} worker(s), "
            f"ZeRO-{cfg.deepspeed.zero_stage}, {'bf16' if self.bf16 else 'fp32'} on "
            f"{self.device.type}{threads}; steps {self.global_step} -> {self.end_step} of "
            f"{cfg.optim.total_steps}"
        )


Checkpointer = Callable[[int, dict[str, Any]], None]
"""Called on every rank at a checkpoint step with (step, that step's metrics record)."""


def run_steps(
    worker: TrainWorker,
    stream: Iterable[pa.Table | pa.RecordBatch],
    *,
    writer: MetricsWriter | None,
    checkpoint: Checkpointer,
) -> None:
    """Train from ``worker.global_step`` to ``worker.end_step``: log every ``run.log_every``
    steps (rank 0, the one with a ``writer``), validate every ``run.eval_every``, checkpoint
    every ``run.checkpoint_every`` and at the end. ``stream``: the rows of
    ``worker.stream_uris()`` in order."""
    run = worker.cfg.run
    start, end = worker.global_step, worker.end_step
    peak = peak_flops(run.peak_flops_per_worker, worker.device)
    if worker.rank == 0:
        print(worker.describe(), flush=True)
    batches = worker.micro_batches(stream)
    t_last = loop_start = time.perf_counter()
    session_tokens, session_time = 0, 0.0
    first_batch_s = validate_s = checkpoint_s = 0.0
    while worker.global_step < end:
        t0 = time.perf_counter()
        step, micros = next(batches)
        wait = time.perf_counter() - t0
        if step == start:  # the data pipeline's start, up to its first batch
            first_batch_s = wait
        assert step == worker.global_step, (step, worker.global_step)
        m = worker.step(micros)
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        session_tokens += m.tokens
        session_time += dt
        record = m.record(dt, wait + m.collate_s, peak, worker.world)
        if worker.ctx.val_rows and (m.step % run.eval_every == 0 or m.step == end):
            record["val_loss"] = worker.validate(worker.ctx.val_rows)
            validate_s += time.perf_counter() - now
        if writer is not None and (m.step % run.log_every == 0 or m.step == end):
            writer.write(record)
            print(format_step(record, end), flush=True)
        if m.step % run.checkpoint_every == 0 or m.step == end:
            t0 = time.perf_counter()
            checkpoint(m.step, record)
            checkpoint_s += time.perf_counter() - t0
    loop_s = time.perf_counter() - loop_start
    if writer is not None:
        writer.write(
            {
                "step": end,
                "final": True,
                "start_step": start,
                "session_tokens": session_tokens,
                "session_time_s": session_time,
                "peak_memory_bytes": peak_memory_bytes(worker.device),
                "torch_threads": torch.get_num_threads(),
                # Where this rank's time went (seconds; "started"/"ended" are epoch seconds, for
                # the driver's fixed-cost breakdown, summary.json "phases"): steps are the loop
                # without its first batch, validations and checkpoints.
                "phases": {
                    **worker.timings,
                    "first_batch_s": first_batch_s,
                    "steps_s": loop_s - first_batch_s - validate_s - checkpoint_s,
                    "validate_s": validate_s,
                    "checkpoint_s": checkpoint_s,
                    "ended": time.time(),
                },
            }
        )
        writer.sync()


# -- Ray Train --------------------------------------------------------------------------------


def _ray_stream(worker: TrainWorker) -> Iterator[pa.Table]:
    import ray.train

    if worker.global_step == worker.ctx.dataset_start_step:
        ds = ray.train.get_dataset_shard(f"train_rank{worker.rank}")
    else:
        # Restarted after a failure from a later checkpoint than the datasets were built for.
        from training.data.shards import read_shards

        ds = read_shards(worker.stream_uris(), worker.cfg.storage).iterator()
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's function: ``{"config": TrainConfig.to_dict(), "context": WorkerContext}``."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    cfg = TrainConfig.from_dict(loop_config["config"])
    ctx: WorkerContext = loop_config["context"]
    worker = TrainWorker(cfg, ctx, local_rank=ray.train.get_context().get_local_rank())
    print(
        f"[train] rank {worker.rank} on node {ray.get_runtime_context().get_node_id()}", flush=True
    )
    writer: MetricsWriter | None = None
    try:
        worker.build()
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and ctx.resume_from:
            from training.data.shards import arrow_filesystem

            fs, path = arrow_filesystem(ctx.resume_from, cfg.storage)
            checkpoint = Checkpoint(path, filesystem=fs)
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                worker.restore(d)
        writer = (
            MetricsWriter(ctx.output, cfg.storage, worker.global_step) if worker.rank == 0 else None
        )

        def report(step: int, record: dict[str, Any]) -> None:
            # Only checkpoints are reported: a report is a barrier across workers, and the
            # per-step metrics already go to metrics.jsonl / TensorBoard.
            # A disk error is a StorageError naming the place and its free space: the driver
            # stops the run on it rather than redo the steps only to meet it again.
            what = f"the checkpoint of step {step}"
            with tempfile.TemporaryDirectory(prefix="gpthf-ckpt-") as tmp:
                with storage_errors(tmp, f"write a local copy of {what} to"):
                    worker.save(tmp)
                if writer is not None:
                    writer.sync()
                with storage_errors(ctx.output, f"write {what} under"):
                    ray.train.report(record, checkpoint=Checkpoint.from_directory(tmp))

        run_steps(worker, _ray_stream(worker), writer=writer, checkpoint=report)
    finally:
        if writer is not None:
            writer.close()
        worker.close()
