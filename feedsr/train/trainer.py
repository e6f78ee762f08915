"""The training loop: batches -> forward/backward step -> logging, validation, checkpoints.

``run(cfg)`` is what ``python -m feedsr.train`` and the tests call. One code path for one or many
processes: the model is always wrapped in TorchRec's DistributedModelParallel (world size 1
included), embedding tables are updated by a fused optimizer inside backward and dense
parameters by AdamW under a OneCycle schedule.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from feedsr.data.batch import Collator
from feedsr.data.config import (
    batch_spec,
    build_loader,
    check_dataset,
    collision_report,
    ensure_dataset,
    tasks_of,
)
from feedsr.data.reader import ReaderConfig, SequenceReader, open_files, split_files
from feedsr.data.schema import CONTEXT_PREFIX, DENSE_PREFIX
from feedsr.data.stats import column_moments, column_quantiles
from feedsr.data.tasks import task_bitmasks
from feedsr.eval.evaluate import evaluate
from feedsr.eval.metrics import TaskMetrics, format_table
from feedsr.model import build_model
from feedsr.runtime.checkpoint import (
    NonFiniteStateError,
    check_complete,
    check_writable_root,
    checkpoint_path,
    is_complete,
    latest_valid_checkpoint,
    load_rank_state,
    load_sharded,
    record_table_sizes,
    save_checkpoint,
    set_rng_state,
    table_size_changes,
)
from feedsr.runtime.collectives import all_reduce, barrier, broadcast
from feedsr.runtime.config import Config, ConfigError, compose_config, config_changes, to_config
from feedsr.runtime.distributed import DistContext, distributed
from feedsr.runtime.sharding import compile_dense, shard_model
from feedsr.train import runlog
from feedsr.train.hdet import HDET, add_noise, scale_dropout, set_attention_temperature
from feedsr.train.loss import MultiTaskLoss, estimate_propensities
from feedsr.train.optim import build_dense_optimizer, schedule_of, set_group_values
from feedsr.train.plots import plot_learning_rates

# Rows of the training split read for the context moments: plenty for a mean and a spread, and a
# bounded read at start on a split of any size.
CONTEXT_MOMENT_ROWS = 200_000
CONTEXT_QUANTILE_VALUES = 300_000  # impressions sampled for the context bins' quantiles


class LogWindow:
    """What the steps since the last log record add up to."""

    def __init__(self):
        self.steps, self.loss_sum, self.task_loss_sum, self.impressions = 0, 0.0, 0.0, 0
        self.start = time.perf_counter()

    def add(self, loss: float, per_task: torch.Tensor, impressions: int) -> None:
        self.steps += 1
        self.loss_sum += loss
        self.task_loss_sum = self.task_loss_sum + per_task
        self.impressions += impressions

    def rate(self) -> float:
        """Impressions per second over the window (all ranks)."""
        return self.impressions / max(time.perf_counter() - self.start, 1e-9)


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf; raised before backward, so no parameter was updated."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed


@dataclass
class RunResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # per step, this process's run only
    valid: dict[str, TaskMetrics] | None = None  # at the last step
    test: dict[str, TaskMetrics] | None = None  # with the best weights by validation
    best: dict | None = None  # best.json: step, score, tasks, validation metrics of that step


def run(cfg) -> RunResult:
    """Train from a composed config (DictConfig, dict or Config); validate it first."""
    config = cfg if isinstance(cfg, Config) else to_config(cfg)
    with distributed(config.trainer.device) as ctx:
        return Trainer(config, ctx).fit()


@contextmanager
def sampled_trainer(overrides: list[str], num_batches: int) -> Iterator[tuple["Trainer", list]]:
    """A real one-process CPU Trainer for these Hydra overrides and its next ``num_batches``
    training batches, read up front (for benchmark and profiling scripts: time steps, not reads)."""
    config = to_config(compose_config(overrides))
    with distributed("cpu") as ctx:
        trainer = Trainer(config, ctx)
        batches = trainer.batches()
        yield trainer, [next(batches) for _ in range(num_batches)]


def default_threads(ctx: DistContext) -> int:
    """Intra-op threads: the cores shared by the processes of this node."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    return max(1, (os.cpu_count() or 1) // local_world)


class Trainer:
    def __init__(self, config: Config, ctx: DistContext):
        self.config, self.ctx = config, ctx
        cfg = config
        self.run_dir = Path(cfg.output_root) / cfg.run_id
        self.resume_from, damaged = latest_valid_checkpoint(self.run_dir)
        for problem in damaged:  # every rank finds the same; rank 0 says it
            self._log(f"WARNING: not resuming from a damaged checkpoint: {problem}")
        self._check_resumed_config()
        check_writable_root(self.run_dir, ctx.rank)  # now, not at the first save; every rank checks
        if cfg.trainer.init_from and self.resume_from is None:
            check_complete(Path(cfg.trainer.init_from))  # before any data is generated
        if ctx.device.type == "cpu":
            torch.set_num_threads(cfg.trainer.num_threads or default_threads(ctx))
        self.meta = self._dataset_meta()
        self.spec = batch_spec(cfg.data, self.meta)
        self._check_table_sizes()
        for line in collision_report(cfg.data, self.meta):
            self._log(f"id collisions: {line}")
        self.tasks = tasks_of(cfg.data)
        self.select_tasks = list(cfg.trainer.select_tasks) or [t.name for t in self.tasks]
        self.best: dict | None = None
        torch.manual_seed(cfg.seed)  # identical dense initialisation on every rank
        model = build_model(cfg.model, self.spec, cfg.data.max_seq_len, device=torch.device("meta"))
        if self.resume_from is None and not cfg.trainer.init_from:  # else the checkpoint's load
            if cfg.model.context_norm:
                self._fit_input_norms(model)
            if getattr(model, "context_bins", None) is not None:
                self._fit_context_bins(model)
        hdet = cfg.trainer.hdet
        self.model = shard_model(model, ctx, cfg.optimizer.sparse, cfg.optimizer.sparse_lr,
                                 cfg.optimizer.sparse_eps,
                                 data_parallel=not (hdet.enabled and hdet.mode == "independent"))
        self.sparse_optimizer = self.model.fused_optimizer
        if cfg.trainer.compile:
            compiled = compile_dense(self.model)
            self._log(f"torch.compile: {', '.join(compiled)} (the first steps of each new shape compile)")
        self.dense_optimizer = build_dense_optimizer(self.model, cfg.optimizer)
        self.schedule = schedule_of(cfg.optimizer, cfg.trainer.max_steps)
        self.hdet = self._hdet() if hdet.enabled else None
        self.loss_fn = MultiTaskLoss(cfg.loss, [t.weight for t in self.tasks], self._propensities())
        self.loss_fn.to(ctx.device)
        # HDET's clean loss scores a slice of the training split held out from training: the
        # validation split picks and reports checkpoints, so it must not steer training too.
        needs_clean = hdet.scalars or hdet.lr_score == "clean"
        self.clean_rows = hdet.clean_batch_rows if hdet.enabled and needs_clean else 0
        self.train_loader = self._loader(cfg.data.train_split, train=True)
        self._check_splits()
        self.state = TrainState()
        self.autocast = torch.bfloat16 if cfg.trainer.precision == "bf16" else None
        torch.manual_seed(cfg.seed * 7919 + ctx.rank + 1)  # dropout differs per rank
        self._start()
        self.clean_batch = self._clean_batch()
        self._apply_scalars()
        self.writer = self._tensorboard()

    # ------------------------------------------------------------------ setup

    def _dataset_meta(self) -> dict:
        """Rank 0 generates synthetic data if needed; the others wait, then read its metadata."""
        from feedsr.prepare.synthetic import generate  # DuckDB: imported only here

        check_dataset(self.config.data)
        if self.ctx.is_main:
            meta = ensure_dataset(self.config.data, generate)
        barrier()
        if not self.ctx.is_main:
            meta = ensure_dataset(self.config.data)
        return meta

    def _check_splits(self) -> None:
        """Every split the run will read, checked before step 1 (bad validation data used to
        surface only at the final validation): files and schema always, every value with
        trainer.check_data=full."""
        data = self.config.data
        splits = [data.train_split, data.valid_split] + ([data.test_split] if self.config.trainer.evaluate_test else [])
        for split in dict.fromkeys(splits):
            files = open_files(split_files(data.path, split), self.spec.read)
            if self.config.trainer.check_data == "full":
                self._log(f"checking every value of the {split} split")
                for _ in SequenceReader(files, self.spec.read, ReaderConfig(batch_size=4096)):
                    pass  # reading validates each row group
        rows, per_step = self.train_loader.dataset.total_rows, data.batch_size * self.ctx.world_size
        if rows < per_step:
            self._log(f"warning: the {data.train_split} split has {rows} rows, fewer than one step's "
                      f"{per_step} (data.batch_size x ranks): every step is a whole epoch, read again "
                      "from disk; lower data.batch_size")

    def _loader(self, split: str, train: bool, head_rows: int | None = None):
        """Training: the split less the holdout. Evaluation: every row, or the split's first
        ``head_rows`` rows in file order (the same rows for any world size)."""
        if train:
            return build_loader(self.config.data, self.spec, split, train=True, seed=self.config.seed,
                                rank=self.ctx.rank, world_size=self.ctx.world_size,
                                head_rows=self.clean_rows)
        return build_loader(self.config.data, self.spec, split, train=False, rank=self.ctx.rank,
                            world_size=self.ctx.world_size, head_rows=head_rows or 0,
                            only_head=head_rows is not None)

    def _propensities(self) -> list[float] | None:
        """Given in the config, or rank 0's (saved or estimated) broadcast to every rank."""
        loss = self.config.loss
        if not loss.ipw:
            return None
        if loss.propensities is not None:
            return list(loss.propensities)
        props = torch.zeros(loss.ipw_num_positions, dtype=torch.float64)
        if self.ctx.is_main:  # one decision, one read of the split per run, not one per rank
            props = torch.tensor(self._saved_or_estimated_propensities(), dtype=torch.float64)
        return broadcast(props).tolist()

    def _saved_or_estimated_propensities(self) -> list[float]:
        """The run's saved propensities when resuming and estimated the same way, else new ones."""
        loss, saved = self.config.loss, self.run_dir / "propensities.json"
        how = {"split": self.config.data.train_split, "reference_task": loss.ipw_reference_task,
               "num_positions": loss.ipw_num_positions, "min_propensity": loss.ipw_min_propensity}
        if self.resume_from is not None and saved.exists():
            record = json.loads(saved.read_text())
            if record.get("estimated_from") == how:
                return record["propensities"]
        props = self._estimate_propensities()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"estimated_from": how, "propensities": props}) + "\n")
        return props

    def _estimate_propensities(self) -> list[float]:
        data, loss = self.config.data, self.config.loss
        files = open_files(split_files(data.path, data.train_split), self.spec.read)
        reader = SequenceReader(files, self.spec.read,
                                ReaderConfig(batch_size=4096, max_seq_len=data.max_seq_len))
        mask = task_bitmasks(self.tasks, list(data.action_names))[loss.ipw_reference_task]
        self._log("estimating feed-position propensities from the training split")
        return estimate_propensities(reader, int(mask), loss.ipw_num_positions, loss.ipw_min_propensity)

    def _fit_input_norms(self, model: torch.nn.Module) -> None:
        """Standardise the late-fused context and the post token's dense features by the training
        split's moments (one read for both)."""
        read = self.spec.read
        norms = [(model.context_norm, [CONTEXT_PREFIX + c for c in read.context])]
        if getattr(model, "dense_norm", None) is not None:
            norms.append((model.dense_norm, [DENSE_PREFIX + c for c in read.dense]))
        norms = [(norm, columns) for norm, columns in norms if columns]
        if not norms:
            return
        mean, std = self._column_moments([c for _, columns in norms for c in columns])
        start = 0
        for norm, columns in norms:
            norm.fit(mean[start:start + len(columns)], std[start:start + len(columns)])
            start += len(columns)

    def _stored_rows(self) -> SequenceReader:
        """The training split's rows as stored (whole, uncut, unshuffled), for its statistics."""
        data = self.config.data
        files = open_files(split_files(data.path, data.train_split), self.spec.read)
        return SequenceReader(files, self.spec.read, ReaderConfig(batch_size=4096, max_seq_len=1 << 30))

    def _fit_context_bins(self, model: torch.nn.Module) -> None:
        """The quantile bins' edges: the training split's quantiles of each context feature, taken
        through the fitted standardisation (a monotone map: the quantiles of the standardised
        feature), on rank 0 and broadcast."""
        columns = [CONTEXT_PREFIX + c for c in self.spec.read.context]
        bins = model.context_bins.edges.shape[1] - 1
        edges = torch.zeros(bins + 1, len(columns), dtype=torch.float64)
        if self.ctx.is_main:
            self._log(f"context bins: {bins} quantiles per feature of the training split")
            edges = torch.tensor(column_quantiles(self._stored_rows(), columns, np.linspace(0, 1, bins + 1),
                                                  CONTEXT_QUANTILE_VALUES))
        edges = broadcast(edges).float()
        with torch.no_grad():
            model.context_bins.fit(model.context_norm(edges).T.contiguous())

    def _column_moments(self, columns: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank 0's mean and std of numeric columns over every impression of the training split's
        rows as stored (its first ``CONTEXT_MOMENT_ROWS`` rows), broadcast to every rank."""
        moments = torch.zeros(2, len(columns), dtype=torch.float64)
        if self.ctx.is_main:
            self._log("standardising the numeric features by the training split's moments")
            moments = torch.tensor(np.stack(column_moments(self._stored_rows(), columns, CONTEXT_MOMENT_ROWS)))
        moments = broadcast(moments).float()
        return moments[0], moments[1]

    def _check_table_sizes(self) -> None:
        """Sizes left null follow the dataset's vocabularies: a dataset re-made since the run
        started would no longer fit the saved tables (or would give ids other rows)."""
        if self.resume_from is None:
            return
        changes = table_size_changes(self.run_dir, self.spec.id_table_sizes)
        if changes:
            raise ConfigError(f"{self.run_dir}: the embedding table sizes differ from the run's "
                              f"({'; '.join(changes)}): was {self.config.data.path} re-made? "
                              "Use another run_id, or the dataset the run started on")

    def _check_resumed_config(self) -> None:
        """Resuming with a config that changes what is learned would silently mix two runs."""
        saved = self.run_dir / "config.yaml"
        if self.resume_from is None or not saved.exists():
            return
        changes = config_changes(saved.read_text(), self.config)
        if changes and not self.config.trainer.allow_config_change:
            raise ConfigError(
                f"{self.run_dir} holds a run with another config; resuming it with this one would "
                f"change: {'; '.join(changes)}. Use another run_id, or trainer.allow_config_change=true")
        if changes:
            self._log(f"resuming with a changed config (trainer.allow_config_change): {'; '.join(changes)}")

    def _start(self) -> None:
        """Resume from the run's newest complete checkpoint, or warm-start, or start fresh."""
        if self.ctx.is_main:
            resolved = OmegaConf.to_yaml(OmegaConf.structured(self.config))
            (self.run_dir / "config.yaml").write_text(resolved)
            record_table_sizes(self.run_dir, self.spec.id_table_sizes)
        barrier()
        resume = self.resume_from
        if resume is not None:
            load_sharded(resume, self.model, self.sparse_optimizer)
            rank_state = load_rank_state(resume, self.ctx)
            self.dense_optimizer.load_state_dict(rank_state["dense_optimizer"])
            self.state = TrainState(**rank_state["train_state"])
            set_rng_state(rank_state["rng"])
            if self.hdet is not None:
                self.hdet.load_state_dict(rank_state["hdet"])
            best = self.run_dir / "best.json"
            self.best = json.loads(best.read_text()) if best.exists() else None
            self._log(f"resumed from {resume} at step {self.state.step}")
            self._truncate_logs()
            return
        if self.config.trainer.init_from:
            load_sharded(Path(self.config.trainer.init_from), self.model, None)
            self._log(f"warm start from {self.config.trainer.init_from} (fresh optimizers and schedule)")
        if self.hdet is not None and self.config.trainer.hdet.noise > 0:
            # after DMP/DDP wrapped the model (DDP broadcasts rank 0's weights when it wraps)
            generator = torch.Generator().manual_seed(self.config.seed * 7919 + self.ctx.rank + 1)
            add_noise(self.dense_params(), self.config.trainer.hdet.noise, generator)
        self._truncate_logs()  # a fresh run in an old directory: drop its stale logs

    def _hdet(self) -> HDET:
        cfg = self.config
        groups = [g["name"] for g in self.dense_optimizer.param_groups]
        bases = {"dropout": 1.0, "weight_decay": cfg.optimizer.weight_decay,
                 "attention_temperature": 1.0}
        return HDET(cfg.trainer.hdet, self.ctx.rank, self.ctx.world_size, self.schedule, groups, bases,
                    cfg.trainer.max_steps)

    def dense_params(self) -> list[torch.Tensor]:
        return [p for g in self.dense_optimizer.param_groups for p in g["params"]]

    def _clean_batch(self):
        """HDET's batch for scoring scalars: the training split's held-out rows (never trained on)."""
        if not self.clean_rows:
            return None
        data = self.config.data
        files = open_files(split_files(data.path, data.train_split), self.spec.read)
        reader = SequenceReader(files, self.spec.read, ReaderConfig(
            batch_size=self.clean_rows, max_seq_len=data.max_seq_len, head_rows=self.clean_rows,
            only_head=True), collate=Collator(self.spec))
        return next(iter(reader)).to(self.ctx.device)

    def _apply_scalars(self) -> None:
        if self.hdet is None:
            return
        values = self.hdet.scalar_values()
        if "dropout" in values:
            scale_dropout(self.model, values["dropout"])
        if "attention_temperature" in values:
            set_attention_temperature(self.model, values["attention_temperature"])
        if "weight_decay" in values:
            decayed = [g["name"] for g in self.dense_optimizer.param_groups if g["name"] != "no_decay"]
            set_group_values(self.dense_optimizer, "weight_decay", {g: values["weight_decay"] for g in decayed})

    def _tensorboard(self):
        if not (self.ctx.is_main and self.config.trainer.tensorboard):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # ------------------------------------------------------------------ the loop

    def batches(self):
        """Training batches forever, epoch after epoch, tracking the position for resumes."""
        reader = self.train_loader.dataset
        while True:
            reader.set_epoch(self.state.epoch, self.state.batch_in_epoch)
            for batch in self.train_loader:
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def learning_rates(self) -> dict[str, float]:
        """This rank's learning rate per dense param group for the coming step."""
        if self.hdet is not None:
            return self.hdet.learning_rates(self.state.step)
        return {g["name"]: self.schedule(self.state.step) for g in self.dense_optimizer.param_groups}

    def train_step(self, batch) -> tuple[float, float, torch.Tensor, int]:
        """One optimizer step; returns (mean loss over ranks, this rank's loss, per-task losses
        (mean over ranks), impressions over ranks)."""
        self.model.train()
        set_group_values(self.dense_optimizer, "lr", self.learning_rates())
        batch = batch.to(self.ctx.device, non_blocking=True)
        with torch.autocast(self.ctx.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            logits = self.model(batch)
        out = self.loss_fn(logits, batch)
        # One all-reduce gives every rank the mean loss, the impression count and whether any rank
        # saw a non-finite loss; it runs before backward because the fused embedding optimizer
        # updates the tables inside backward.
        # It also carries whether the previous update left a dense parameter non-finite (a
        # finite loss does not prove a finite update), so that needs no collective of its own.
        finite = torch.isfinite(out.loss.detach())
        local = float(out.loss.detach()) if bool(finite) else float("nan")
        diverged = torch.stack([~torch.isfinite(p).all() for p in self.dense_params()]).sum()
        stats = torch.cat([torch.stack([torch.where(finite, out.loss.detach(), 0.0).float(), (~finite).float(),
                                        torch.tensor(float(batch.lengths.sum()), device=finite.device),
                                        diverged.float()]),
                           out.per_task.float()])
        stats = all_reduce(stats)
        if stats[3] > 0:
            names = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
            raise NonFiniteStateError(
                f"the update of step {self.state.step} left non-finite parameters (on {int(stats[3])} "
                f"tensor(s) over all ranks; this rank: {', '.join(names[:5]) or 'none'}); stopped before "
                f"step {self.state.step + 1}. Lower optimizer.lr or check the data.")
        if stats[1] > 0:
            raise NonFiniteLossError(
                f"non-finite loss at step {self.state.step + 1} (on {int(stats[1])} rank(s)); "
                "stopped before any parameter update. Lower optimizer.lr or check the data."
            )
        out.loss.backward()
        if self.config.optimizer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.dense_params(), self.config.optimizer.grad_clip)
        self.dense_optimizer.step()
        self.dense_optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        world = self.ctx.world_size
        return float(stats[0]) / world, local, stats[4:].cpu() / world, int(stats[2])

    def fit(self) -> RunResult:
        cfg = self.config.trainer
        result = RunResult(self.run_dir, self.state.step)
        progress = tqdm(total=cfg.max_steps, initial=self.state.step, desc="train", unit="step",
                        disable=not (self.ctx.is_main and cfg.progress), dynamic_ncols=True)
        window = LogWindow()
        batches = self.batches()
        while self.state.step < cfg.max_steps:
            loss, local_loss, per_task, imps = self.train_step(next(batches))
            result.losses.append(loss)
            window.add(loss, per_task, imps)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{self.schedule(self.state.step - 1):.2e}",
                                 imps=f"{window.rate():,.0f}/s", refresh=False)
            if self.state.step % cfg.log_every == 0 or self.state.step == cfg.max_steps:
                self._record(window)  # before a converge re-draws HDET's permutations
                window = LogWindow()
            if self.hdet is not None:
                self.hdet.record_loss(local_loss)
                if self.hdet.is_converge_step(self.state.step):
                    self.converge()
            if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                self.checkpoint()
            if cfg.val_every and self.state.step % cfg.val_every == 0 and self.state.step < cfg.max_steps:
                self.validate()
        progress.close()
        if not is_complete(checkpoint_path(self.run_dir, self.state.step)):
            self.checkpoint()  # the final state, unless checkpoint_every just saved it
        result.step = self.state.step
        result.valid = self.validate()
        result.best = self.best
        if cfg.evaluate_test:
            if self.best is not None and self.best["step"] != self.state.step:
                load_sharded(checkpoint_path(self.run_dir, self.best["step"]), self.model, None)
                self._log(f"loaded the best checkpoint by validation (step {self.best['step']}) for the test")
            result.test = self.evaluate_split(self.config.data.test_split, "test")  # every target
        if self.writer:
            self.writer.close()
        if self.hdet is not None and self.ctx.is_main:
            plot_learning_rates(self.run_dir / "train_log.jsonl", self.run_dir / "hdet_learning_rates.png")
        return result

    def converge(self) -> None:
        """HDET's converge: clean loss (for scalars), meta-update, parameter averaging; timed."""
        start = time.perf_counter()
        clean = self._clean_loss() if self.clean_batch is not None else None
        report = self.hdet.converge(self.state.step, self.dense_params(), clean)
        self._apply_scalars()
        seconds = time.perf_counter() - start
        if self.ctx.is_main:
            runlog.append(self.run_dir / "hdet_converges.jsonl",
                          report | {"seconds": seconds, "clean_loss": clean,
                                    "base_lrs": self.hdet.base_learning_rates(self.state.step),
                                    "scalars": self.hdet.scalar_values()})

    @torch.no_grad()
    def _clean_loss(self) -> float:
        """Loss of this replica on the held-out batch with dropout off (eval mode)."""
        self.model.eval()
        logits = self.model(self.clean_batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.float()[self.clean_batch.target_mask], self.clean_batch.labels[self.clean_batch.target_mask])
        return float(loss)

    # ------------------------------------------------------------------ evaluation, logging, saving

    def evaluate_split(self, split: str, label: str, max_rows: int | None = None) -> dict[str, TaskMetrics]:
        metrics = evaluate(self.model, self._loader(split, train=False, head_rows=max_rows),
                           [t.name for t in self.tasks], self.ctx.device, autocast_dtype=self.autocast)
        self._log(f"{label} metrics at step {self.state.step} ({split} split):\n{format_table(metrics)}")
        if self.writer:
            for name, m in metrics.items():
                for key in ("auc", "ne", "calibration"):
                    self.writer.add_scalar(f"{label}/{name}/{key}", getattr(m, key), self.state.step)
        if self.ctx.is_main:
            runlog.put(self.run_dir / f"{label}_metrics.jsonl",
                          {"step": self.state.step, "metrics": {k: m.to_dict() for k, m in metrics.items()}})
        return metrics

    def validate(self) -> dict[str, TaskMetrics]:
        metrics = self.evaluate_split(self.config.data.valid_split, "valid", self.config.trainer.val_max_rows)
        self._select(metrics)
        return metrics

    def _select(self, metrics: dict[str, TaskMetrics]) -> None:
        """Keep the best step by mean validation AUC over the selection tasks (every rank holds the
        same all-gathered metrics, so all take the same decision)."""
        aucs = [metrics[t].auc for t in self.select_tasks if not math.isnan(metrics[t].auc)]
        score = sum(aucs) / len(aucs) if aucs else -math.inf
        if self.best is not None and score <= self.best["score"]:
            return
        if not is_complete(checkpoint_path(self.run_dir, self.state.step)):
            self.checkpoint()
        self.best = {"step": self.state.step, "score": score, "tasks": self.select_tasks,
                     "metrics": {k: m.to_dict() for k, m in metrics.items()}}
        if self.ctx.is_main:
            tmp = self.run_dir / "best.json.tmp"
            tmp.write_text(json.dumps(self.best, indent=1) + "\n")
            os.replace(tmp, self.run_dir / "best.json")
        self._log(f"best so far by validation: step {self.state.step}, mean AUC "
                  f"{score:.4f} over {', '.join(self.select_tasks)}")

    def checkpoint(self) -> None:
        rank_state = {"dense_optimizer": self.dense_optimizer.state_dict(),
                      "train_state": vars(self.state).copy(),
                      "hdet": self.hdet.state_dict() if self.hdet is not None else None}
        path = save_checkpoint(self.run_dir, self.state.step, self.model, self.sparse_optimizer,
                               rank_state, self.ctx, self.config.trainer.keep_checkpoints,
                               protect=self.best["step"] if self.best is not None else None)
        self._log(f"saved {path}")

    def _record(self, window: LogWindow) -> None:
        """The log_every record: means over the window's steps, this step's learning rates."""
        if not self.ctx.is_main:
            return
        step, lr = self.state.step, self.schedule(self.state.step - 1)
        loss, rate = window.loss_sum / window.steps, window.rate()
        tasks = {t.name: float(v) / window.steps for t, v in zip(self.tasks, window.task_loss_sum)}
        record = {"step": step, "loss": loss, "lr": lr, "task_loss": tasks, "impressions_per_s": rate}
        if self.hdet is not None:  # rank 0 knows every rank's rates: shared bases and permutations
            record["base_lrs"] = self.hdet.base_learning_rates(step - 1)
            record["rank_lrs"] = {g: [self.hdet.learning_rates(step - 1, r)[g]
                                      for r in range(self.ctx.world_size)] for g in record["base_lrs"]}
            for g, lrs in record["rank_lrs"].items():
                for r, value in enumerate(lrs):
                    if self.writer:
                        self.writer.add_scalar(f"hdet/lr_{g}/rank{r}", value, step)
                if self.writer:
                    self.writer.add_scalar(f"hdet/base_lr_{g}", record["base_lrs"][g], step)
        runlog.append(self.run_dir / "train_log.jsonl", record)
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/impressions_per_s", rate, step)
            for name, value in tasks.items():
                self.writer.add_scalar(f"train/loss_{name}", value, step)
        if not self.config.trainer.progress:
            self._log(f"step {step}: loss {loss:.4f} lr {lr:.2e} {rate:,.0f} impressions/s")

    def _truncate_logs(self) -> None:
        """Drop log lines of steps that will be redone (all of them on a fresh start)."""
        if self.ctx.is_main:
            for message in runlog.truncate_run_logs(self.run_dir, self.state.step):
                self._log(message)

    def _log(self, message: str) -> None:
        if self.ctx.is_main:
            tqdm.write(f"[feedsr] {message}")
