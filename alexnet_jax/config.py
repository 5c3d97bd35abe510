"""Default hyper-parameters shared by every config file, and the check run before anything compiles.

Config files in configs/ start from `base_config()` and override what their recipe needs. The key names
marked as contract in DESIGN.md (seed, batch_size, model.*, data.*, optim.*, mesh.model, ...) are relied on by
users' scripts: add keys, never rename them.
"""

import ml_collections

from alexnet_jax import optim, storage

SOURCES = ("digits", "synthetic", "imagefolder", "arrayrecord")
DTYPES = ("float32", "bfloat16", "float16")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global, across all processes and devices
    c.num_epochs = 90
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.log_every_steps = 100
    c.eval_every_steps = -1  # <= 0: once per epoch
    c.checkpoint_every_steps = 1000
    c.max_checkpoints_to_keep = 3
    c.eval_batch_size = -1  # <= 0: same as batch_size

    c.model = ml_collections.ConfigDict()
    c.model.variant = "owt"
    c.model.num_classes = 1000
    c.model.width = 1.0
    c.model.dtype = "float32"
    c.model.activation = "relu"
    c.model.dropout_rate = 0.5

    c.data = ml_collections.ConfigDict()
    c.data.source = "imagefolder"
    c.data.train_path = ""
    c.data.eval_path = ""
    c.data.image_size = 224
    c.data.resize_size = 256  # eval: resize the short side to this, then centre-crop image_size
    c.data.random_flip = True  # on-device horizontal flip of train images
    c.data.workers = 0  # grain worker processes; 0 decodes in the training process
    c.data.synthetic_examples = 1024  # size of the `synthetic` source's train split (eval gets a quarter)
    c.data.augment = "alexnet"  # train crops: "alexnet" (short side resize_size, random image_size square) or
    # "inception" (random-resized crop: 8-100% of the area, aspect 3/4-4/3, resized to image_size)
    c.data.lighting_std = 0.1  # AlexNet's PCA colour noise, on the device (0 disables)
    c.data.eval_crops = 1  # 1: centre crop; 10: the paper's four corners + centre and their mirrors, averaged
    # A flat val folder's ground truth: LOC_val_solution.csv or the devkit's ILSVRC2012_validation_ground_truth.txt;
    # "" looks for either in eval_path and up to four folders above it.
    c.data.val_labels = ""
    c.data.labels_file = ""  # wnids in the devkit's ILSVRC2012_ID order: needed only with the devkit ground truth

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "sgd"
    c.optim.learning_rate = 0.01
    c.optim.schedule = "step"
    c.optim.decay_epochs = 30
    c.optim.decay_factor = 0.1
    c.optim.exponential_decay_rate = 0.94
    c.optim.end_learning_rate_factor = 0.0
    c.optim.warmup_steps = 0
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4
    c.optim.clip_norm = 0.0

    # Gradient-explosion guard (alexnet_jax/stability.py). A step with a non-finite loss, gradient or update is
    # always skipped on the device; these set what the host does about it and about loss spikes.
    c.stability = ml_collections.ConfigDict()
    c.stability.layer_stats_every = 100  # per-layer grad_norm/<layer> in the train row about this often (steps)
    c.stability.spike_factor = 2.0  # roll back when a row's loss > this x the running median (0: never) ...
    c.stability.spike_min_delta = 0.5  # ... and exceeds the median by this much (nats), so noise never fires
    c.stability.spike_window = 20  # running median over this many log rows
    c.stability.max_consecutive_skips = 10  # ... or when this many steps in a row were skipped (0: never)
    c.stability.skip_batches = 200  # after a rollback, data resumes this many batches past the spike (PaLM 200-500)
    c.stability.lr_factor = 1.0  # learning rate multiplied by this at each rollback (1: unchanged)
    c.stability.max_rollbacks = 3  # the next spike stops the run (exit code 3)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.model = 1  # size of the 'model' mesh axis; 'data' takes the remaining devices
    return c


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Raises ConfigError naming the first bad key, before any file is written or anything compiles."""
    # Local imports keep `import alexnet_jax.config` (done by every config file) light.
    from alexnet_jax import models, stability
    from alexnet_jax.data import pipeline

    problems = []
    m, d = config.model, config.data
    if m.variant not in models.VARIANTS:
        problems.append(f"model.variant must be one of {', '.join(models.VARIANTS)} (got {m.variant!r})")
    if m.activation not in models.ACTIVATIONS:
        problems.append(f"model.activation must be one of {', '.join(models.ACTIVATIONS)} (got {m.activation!r})")
    if m.dtype not in DTYPES:
        problems.append(f"model.dtype must be one of {', '.join(DTYPES)} (got {m.dtype!r})")
    if m.num_classes < 2:
        problems.append(f"model.num_classes must be >= 2 (got {m.num_classes})")
    if not m.width > 0:
        problems.append(f"model.width must be > 0 (got {m.width})")
    if not 0 <= m.dropout_rate < 1:
        problems.append(f"model.dropout_rate must be in [0, 1) (got {m.dropout_rate})")
    if d.source not in SOURCES:
        problems.append(f"data.source must be one of {', '.join(SOURCES)} (got {d.source!r})")
    elif d.source in ("imagefolder", "arrayrecord"):
        for key in ("train_path", "eval_path"):
            path = d[key]
            if not path:
                problems.append(f"data.{key} must be set for data.source={d.source!r}")
            elif (problem := storage.problem(path)) is not None:  # local, or gs:// (bucket reachable, object there)
                problems.append(f"data.{key}: {problem}")
            elif d.source == "arrayrecord" and storage.problem(storage.join(path, "manifest.json"), "file"):
                problems.append(f"data.{key}: {path} has no manifest.json (convert it with alexnet_jax.data.convert)")
    if d.image_size < 64:
        problems.append(f"data.image_size must be >= 64 (got {d.image_size})")
    if d.resize_size < d.image_size:
        problems.append(f"data.resize_size must be >= data.image_size (got {d.resize_size} < {d.image_size})")
    if d.workers < 0:
        problems.append(f"data.workers must be >= 0 (got {d.workers})")
    if d.augment not in pipeline.AUGMENTATIONS:
        problems.append(f"data.augment must be one of {', '.join(pipeline.AUGMENTATIONS)} (got {d.augment!r})")
    if not d.lighting_std >= 0:
        problems.append(f"data.lighting_std must be >= 0 (got {d.lighting_std})")
    if d.eval_crops not in pipeline.EVAL_CROPS:
        problems.append(f"data.eval_crops must be one of {', '.join(map(str, pipeline.EVAL_CROPS))} "
                        f"(got {d.eval_crops})")
    for key in ("val_labels", "labels_file"):
        if d[key] and (problem := storage.problem(d[key], "file")) is not None:
            problems.append(f"data.{key}: {problem}")
    if config.mesh.model < 1 or num_devices % config.mesh.model:
        problems.append(f"mesh.model must divide the {num_devices} devices (got {config.mesh.model})")
    data_devices = max(1, num_devices // max(1, config.mesh.model))
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if key == "eval_batch_size" and value <= 0:
            continue
        if value <= 0:
            problems.append(f"{key} must be > 0 (got {value})")
        elif value % data_devices or value % num_processes:
            problems.append(f"{key}={value} must be divisible by the {data_devices} data-parallel devices"
                                            f" and {num_processes} processes")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        problems.append("num_epochs must be > 0 when num_train_steps <= 0")
    for key in ("log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep"):
        if config[key] <= 0:
            problems.append(f"{key} must be > 0 (got {config[key]})")
    problems += optim.validate_optim_config(config.optim)
    problems += stability.validate_stability_config(config.stability)
    if problems:
        raise ConfigError(problems[0])
