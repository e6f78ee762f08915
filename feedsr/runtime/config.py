"""The whole run's config: one dataclass per group, merged over the composed Hydra config.

The data and model configs live next to their code (``feedsr/data``, ``feedsr/model``); the loss,
optimizer, trainer and HDET configs live here rather than next to ``feedsr/train``, because
evaluation and serving read a run's config too and must not import the trainer (layers:
data -> model -> runtime -> eval -> {train, serve}).

Merging the composed YAML into these typed dataclasses is what makes an unknown key or a wrong type
fail at start, with OmegaConf naming the full key; ``__post_init__`` methods check values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from feedsr.data.config import DataConfig, tasks_of
from feedsr.model.config import ModelConfig, check_model_config


def require(ok: bool, key: str, value, rule: str) -> None:
    """ValueError naming the key, the rule and the value, unless ``ok``."""
    if not ok:
        raise ValueError(f"{key} must be {rule}, got {value!r}")


@dataclass
class LossConfig:
    ipw: bool = True
    propensities: list[float] | None = None  # per feed position; null: estimate from train data
    ipw_num_positions: int = 60
    ipw_min_propensity: float = 0.1  # clip: no weight above 10
    ipw_reference_task: int = 0  # task whose positive rate by position estimates propensities
    position_decay: bool = True
    temporal_decay: bool = True
    temporal_half_life_days: float = 60.0
    temporal_min_weight: float = 1e-4
    label_smoothing: float = 0.0

    def __post_init__(self):
        if not 0 < self.ipw_min_propensity <= 1:
            raise ValueError(f"loss.ipw_min_propensity must be in (0, 1], got {self.ipw_min_propensity}")
        if self.temporal_half_life_days <= 0:
            raise ValueError(f"loss.temporal_half_life_days must be > 0, got {self.temporal_half_life_days}")
        require(self.propensities is None or len(self.propensities) >= 1, "loss.propensities",
                self.propensities, "null or a list with one value per feed position")
        if self.propensities is not None and not all(0 < p <= 1 for p in self.propensities):
            raise ValueError(f"loss.propensities must be in (0, 1], got {self.propensities}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        require(self.ipw_num_positions >= 1, "loss.ipw_num_positions", self.ipw_num_positions, ">= 1")
        require(self.ipw_reference_task >= 0, "loss.ipw_reference_task", self.ipw_reference_task, ">= 0")
        require(0 < self.temporal_min_weight <= 1, "loss.temporal_min_weight", self.temporal_min_weight,
                "in (0, 1]")


@dataclass
class ScalarConfig:
    """Another scalar explored through HDET's protocol (scored on the clean loss).

    ``dropout`` is a multiplier on every configured dropout rate (starting at 1: rates configured 0
    stay 0); ``weight_decay`` and ``attention_temperature`` are the values themselves (starting at
    optimizer.weight_decay and 1).
    """

    name: str = "dropout"  # dropout | weight_decay | attention_temperature
    alpha: float = 0.5  # spread: values over [base (1 - alpha), base (1 + alpha)]
    auto: bool = True  # meta-update the base at converges (else spread + averaging only)
    min_value: float = 0.0
    max_value: float | None = None  # None: twice the starting value

    def __post_init__(self):
        if self.name not in SCALARS:
            raise ValueError(f"hdet scalar name must be one of {sorted(SCALARS)}, got '{self.name}'")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"hdet scalar '{self.name}': alpha must be in [0, 1), got {self.alpha}")
        if self.min_value < 0 or (self.max_value is not None and self.min_value > self.max_value):
            raise ValueError(f"hdet scalar '{self.name}': need 0 <= min_value <= max_value, got "
                             f"{self.min_value}, {self.max_value}")


SCALARS = ("dropout", "weight_decay", "attention_temperature")


@dataclass
class HDETConfig:
    enabled: bool = False
    mode: str = "sync"  # sync: DDP every step | independent: no gradient sync between converges
    alpha: float = 1 / 9  # learning-rate spread; 0 = plain DDP
    converge_every: int = 1000  # T
    auto_lr: bool = True
    # schedule: a factor on the base schedule (the run keeps its shape; the replicas' losses steer
    # its level) | geometric: the paper's base, decayed geometrically to the schedule's floor.
    # schedule is the default: at equal AUC it kept plain DDP's loss, geometric raised it (docs/hdet.md)
    auto_lr_mode: str = "schedule"
    # what scores the learning rates: train (each replica's window training loss, the paper's; on
    # its own data) | clean (each replica's loss on the same held-out training rows, no dropout)
    lr_score: str = "train"
    warm_steps: int = 0  # S_warm: meta-updates from this step on
    sigma: float = 0.1  # softmax temperature over loss gaps
    lam: float = 0.5  # lambda: step size of the base update
    beta: float = 0.9  # velocity momentum
    lr_max_factor: float = 10.0  # geometric: base in [floor, peak * this] | schedule: factor in [1/this, this]
    noise: float = 0.0  # warm noisy start: nu (0 = off)
    seed: int = 0  # seeds the shared permutation generator (identical on every rank)
    scalars: list[ScalarConfig] = field(default_factory=list)
    clean_batch_rows: int = 256  # held-out rows for the clean loss (scalars, lr_score=clean)

    def __post_init__(self):
        if self.mode not in ("sync", "independent"):
            raise ValueError(f"trainer.hdet.mode must be sync or independent, got '{self.mode}'")
        if self.auto_lr_mode not in ("geometric", "schedule"):
            raise ValueError(f"trainer.hdet.auto_lr_mode must be geometric or schedule, got '{self.auto_lr_mode}'")
        if self.lr_score not in ("train", "clean"):
            raise ValueError(f"trainer.hdet.lr_score must be train or clean, got '{self.lr_score}'")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"trainer.hdet.alpha must be in [0, 1), got {self.alpha}")
        if self.converge_every < 1:
            raise ValueError(f"trainer.hdet.converge_every must be >= 1, got {self.converge_every}")
        if self.sigma <= 0 or not 0 <= self.beta < 1 or self.lam < 0:
            raise ValueError(f"hdet needs sigma > 0, 0 <= beta < 1, lam >= 0; got "
                             f"{self.sigma}, {self.beta}, {self.lam}")
        if self.noise < 0:
            raise ValueError(f"trainer.hdet.noise must be >= 0, got {self.noise}")
        require(self.warm_steps >= 0, "trainer.hdet.warm_steps", self.warm_steps, ">= 0")
        require(self.lr_max_factor >= 1, "trainer.hdet.lr_max_factor", self.lr_max_factor, ">= 1")
        require(self.clean_batch_rows >= 1, "trainer.hdet.clean_batch_rows", self.clean_batch_rows, ">= 1")
        names = [sc.name for sc in self.scalars]
        require(len(set(names)) == len(names), "trainer.hdet.scalars", names, "distinct names")


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adam (dense parameters)
    lr: float = 1e-3  # peak learning rate of the schedule
    weight_decay: float = 0.01  # not applied to norms, biases, scalars, position tables
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global norm of dense gradients; 0 = off
    schedule: str = "onecycle"  # onecycle | constant
    warmup_pct: float = 0.1  # OneCycle: share of steps rising to the peak
    div_factor: float = 25.0  # OneCycle: start = peak / div_factor
    final_div_factor: float = 1e3  # OneCycle: end = start / final_div_factor
    sparse: str = "rowwise_adagrad"  # rowwise_adagrad | adagrad | sgd (fused, in backward)
    sparse_lr: float = 0.05
    sparse_eps: float = 1e-8

    def __post_init__(self):
        if self.name not in ("adamw", "adam"):
            raise ValueError(f"optimizer.name must be adamw or adam, got '{self.name}'")
        if self.schedule not in ("onecycle", "constant"):
            raise ValueError(f"optimizer.schedule must be onecycle or constant, got '{self.schedule}'")
        if self.sparse not in ("rowwise_adagrad", "adagrad", "sgd"):
            raise ValueError(f"optimizer.sparse must be rowwise_adagrad, adagrad or sgd, got '{self.sparse}'")
        if self.lr <= 0 or self.sparse_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got lr={self.lr}, sparse_lr={self.sparse_lr}")
        if not 0 <= self.warmup_pct < 1:
            raise ValueError(f"optimizer.warmup_pct must be in [0, 1), got {self.warmup_pct}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optimizer.betas",
                list(self.betas), "two values in [0, 1)")
        require(self.div_factor >= 1, "optimizer.div_factor", self.div_factor, ">= 1 (start = lr / div_factor)")
        require(self.final_div_factor >= 1, "optimizer.final_div_factor", self.final_div_factor, ">= 1")
        require(self.eps > 0, "optimizer.eps", self.eps, "> 0")
        require(self.sparse_eps > 0, "optimizer.sparse_eps", self.sparse_eps, "> 0")
        require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, ">= 0")
        require(self.grad_clip >= 0, "optimizer.grad_clip", self.grad_clip, ">= 0 (0 = off)")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    # Every log_every steps (and at the last): a train_log.jsonl line, TensorBoard scalars and,
    # without the progress bar, a printed line; loss and throughput are means over those steps.
    log_every: int = 50
    val_every: int = 0  # 0: validate only at the end
    # Validation reads the split's first val_max_rows rows in file order (None: all of them): the
    # same rows whatever the world size, so the checkpoint chosen does not depend on it.
    val_max_rows: int | None = None
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    init_from: str | None = None  # warm start: weights from this checkpoint, fresh optimizers
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast on GPU)
    num_threads: int | None = None  # torch intra-op threads per process (None: torch's choice)
    compile: bool = False  # torch.compile the dense blocks (transformer / DCN, heads); embeddings stay eager
    progress: bool = True
    tensorboard: bool = True
    # Before step 1 every split the run reads is opened and its schema checked; "full" also reads
    # every value once (a pass over the data: NaN in a context column, bad ids, ...).
    check_data: str = "files"  # files | full
    evaluate_test: bool = False  # evaluate the test split at the end and print the table
    # Checkpoint selection: after every validation, the run's best so far (highest mean validation
    # AUC over these tasks; every task when empty) is recorded in best.json and its checkpoint is
    # never pruned; the test split is evaluated with the best weights.
    select_tasks: list[str] = field(default_factory=list)
    # Resuming refuses a config that differs from the run's saved one in a key that changes the
    # model, the data or the optimization (see RESUMABLE_CHANGES); true accepts it.
    allow_config_change: bool = False
    hdet: HDETConfig = field(default_factory=HDETConfig)

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1, got {self.max_steps}")
        if self.keep_checkpoints < 2:
            raise ValueError(f"trainer.keep_checkpoints must be >= 2, got {self.keep_checkpoints}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"trainer.device must be auto, cpu or cuda, got '{self.device}'")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"trainer.precision must be fp32 or bf16, got '{self.precision}'")
        require(self.log_every >= 1, "trainer.log_every", self.log_every, ">= 1")
        require(self.check_data in ("files", "full"), "trainer.check_data", self.check_data, "files or full")
        for name in ("val_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        require(self.val_max_rows is None or self.val_max_rows >= 1, "trainer.val_max_rows",
                self.val_max_rows, ">= 1 or null (the whole split)")
        require(self.num_threads is None or self.num_threads >= 1, "trainer.num_threads", self.num_threads,
                ">= 1 or null")


@dataclass
class Config:
    data: DataConfig = MISSING  # from conf/data/*.yaml (no default: dict fields merge key by key)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run_id: str = "default"  # the run directory is <output_root>/<run_id>, the same on every rank
    output_root: str = "runs"
    seed: int = 0

    def __post_init__(self):
        """Constraints across groups, checked before any data is generated or read."""
        check_model_config(self.model, self.data)
        tasks = [t.name for t in tasks_of(self.data)]
        require(self.loss.ipw_reference_task < len(tasks), "loss.ipw_reference_task",
                self.loss.ipw_reference_task, f"the index of a task in data.tasks {tasks}")
        unknown = [t for t in self.trainer.select_tasks if t not in tasks]
        require(not unknown, "trainer.select_tasks", list(self.trainer.select_tasks),
                f"names of tasks in data.tasks {tasks} (unknown: {unknown})")


# Keys a resumed run may change freely: how it logs, validates, saves and runs, not what it learns.
# Not among them: data.num_workers (each worker reads its own slice of a rank's rows, so the
# resumed epoch would skip other rows), trainer.val_max_rows and trainer.select_tasks (best.json's
# score would compare two different measures).
RESUMABLE_CHANGES = (
    "trainer.log_every", "trainer.val_every", "trainer.checkpoint_every", "trainer.keep_checkpoints",
    "trainer.device", "trainer.num_threads", "trainer.compile", "trainer.progress",
    "trainer.tensorboard", "trainer.evaluate_test", "trainer.allow_config_change", "trainer.check_data",
    "data.eval_batch_size", "output_root", "run_id",
)


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _as_of_now(old: dict) -> dict:
    """A saved config's flat keys in today's spelling: the model keys added since it may have
    been saved take the meaning the model had before them (the interleaved backbone; RoPE by
    position, or by time where the former ``model.rope_time`` said so)."""
    old = dict(old)
    rope_time = old.pop("model.rope_time", None)
    old.setdefault("model.rope", "time" if rope_time else "position")
    old.setdefault("model.backbone", "interleaved")
    old.setdefault("model.action_value_scale", 1.0)
    return old


def config_changes(saved_yaml: str, config: Config) -> list[str]:
    """Keys (with old and new values) where ``config`` differs from a run's saved config.yaml in
    something other than RESUMABLE_CHANGES."""
    old = _as_of_now(_flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml))))
    new = _flatten(OmegaConf.to_container(OmegaConf.structured(config)))
    new.pop("model.rope_time", None)  # always null once read: model.rope holds its meaning
    keys = sorted(k for k in set(old) | set(new)
                  if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


SCHEMA_NAME = "feedsr_schema"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"  # inside the package: a plain `pip install .` ships it


def register_schema() -> None:
    """Make the dataclasses Hydra's schema (the first entry of conf/config.yaml's defaults), so that
    composition knows every field (overridable without '+') and type-checks command-line values."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


register_schema()


def compose_config(overrides: list[str] = ()) -> DictConfig:
    """The composed Hydra config for these overrides, as ``python -m feedsr.train`` would see it
    (for scripts and tests; validate it with ``to_config``)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the key."""


def to_config(cfg: DictConfig | dict) -> Config:
    """Validate a composed config against the dataclasses; ConfigError naming the key if not."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), _without_hydra(cfg))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {e}") from None
    except ValueError as e:
        raise ConfigError(f"invalid config: {e}") from None


def _without_hydra(cfg):
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
    if "hydra" in cfg:
        del cfg["hydra"]
    return cfg
