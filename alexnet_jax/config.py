"""Default hyper-parameters shared by every config file, and the check run before anything compiles.

Config files in configs/ start from `base_config()` and override what their recipe needs. The key names (seed,
batch_size, model.*, data.*, optim.*, mesh.model, ...) are relied on by users' scripts: add keys, never rename
them.
"""

import ml_collections

from alexnet_jax import optim, storage

SOURCES = ("digits", "synthetic", "imagefolder", "arrayrecord")
DTYPES = ("auto", "float32", "bfloat16")
BEST_METRICS = ("eval_top1", "eval_ema_top1")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global, across all processes and devices
    c.num_epochs = 90
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.log_every_steps = 100
    # Persistent XLA compilation cache: a rerun (resume, eval, another process) skips recompiling. "" turns it
    # off; the JAX_COMPILATION_CACHE_DIR environment variable, when set, wins.
    c.compilation_cache_dir = "~/.cache/alexnet_jax/xla"
    c.profile_steps = ""  # "A:B": a jax.profiler trace of steps A..B-1 in workdir/profile (TensorBoard)
    c.eval_every_steps = -1  # <= 0: once per epoch
    c.checkpoint_every_steps = 1000
    c.max_checkpoints_to_keep = 3
    # The eval metric that ranks checkpoints (the best one is kept beside the newest) and picks the weights that
    # predict/evaluate/export load by default: eval_top1 (raw weights) or eval_ema_top1 (needs optim.ema_decay > 0).
    c.best_metric = "eval_top1"
    # A workdir lock whose heartbeat is this old has lost its trainer (see workdir_lock.py and the README).
    c.workdir_lock_timeout_s = 300.0
    # Where checkpoints exist but every one is damaged, the run stops (exit 2) rather than train from step 0;
    # True moves them aside as <step>.corrupt-<time> and starts over.
    c.restart_if_checkpoints_unusable = False
    c.eval_batch_size = -1  # <= 0: same as batch_size
    # BatchNorm models: before every eval and save, BN statistics are recomputed at the current weights over this
    # many training examples (eval view, rounded down to whole batches; 0 = off: the running averages are used).
    # ~1-10k suffice (Wu & Johnson 2021). A forward pass over 4096 costs about what 1.4k training images do: ~0.3%
    # of training time with configs/imagenet.py's checkpoint cadence.
    c.precise_bn_examples = 4096

    c.model = ml_collections.ConfigDict()
    c.model.variant = "owt"
    c.model.num_classes = 1000
    c.model.width = 1.0
    # Compute dtype; params are always float32. "auto": bfloat16 on GPUs and TPUs (their matrix units' native
    # type, float32's exponent range), float32 on CPUs. float16 is refused: it needs loss scaling, which we omit.
    c.model.dtype = "auto"
    c.model.space_to_depth = False  # conv1 as an equal 3x3 conv on 4x4 space-to-depth blocks (MLPerf's TPU stem)
    # Max-pool gradient: "xla" (select_and_scatter), "slices" (9 strided window offsets; same selection, ties
    # included), "auto": slices on CPUs, where XLA's is a slow loop, xla elsewhere.
    c.model.max_pool_grad = "auto"
    c.model.activation = "relu"
    c.model.dropout_rate = 0.5

    c.data = ml_collections.ConfigDict()
    c.data.source = "imagefolder"
    c.data.train_path = ""
    c.data.eval_path = ""
    c.data.image_size = 224
    # The short side before cropping image_size (train "alexnet" crops and eval centre crops): 256/224 of the
    # crop unless set, so overriding image_size alone keeps the paper's proportions (64 -> 73, 224 -> 256).
    c.data.resize_size = c.data.get_ref("image_size") * 256 // 224
    c.data.random_flip = True  # on-device horizontal flip of train images
    # grain worker processes; 0 decodes in the training process; -1 chooses per pipeline from the usable cores and
    # the images it decodes (none for small runs and splits; see data/pipeline.py auto_workers), logged once.
    c.data.workers = 0
    # Decode threads in each worker (0: one image at a time). Decoding releases the GIL, so N threads let one
    # process use N cores: fewer workers, each holding its own copy of the file list, for the same throughput.
    c.data.worker_threads = 0
    c.data.worker_buffer = 1  # finished batches each worker keeps ready (grain's per_worker_buffer_size)
    # Train batches already handed to the devices beyond the one a step uses: their host-to-device copies run
    # while the step computes (0: each batch is copied when the step asks for it).
    c.data.device_prefetch = 2
    c.data.synthetic_examples = 1024  # size of the `synthetic` source's train split (eval gets a quarter)
    c.data.augment = "alexnet"  # train crops: "alexnet" (short side resize_size, random image_size square) or
    # "inception" (random-resized crop: 8-100% of the area, aspect 3/4-4/3, resized to image_size)
    # The train crop cut in the train step instead of on the host: the host ships each stored array whole and the
    # device draws the crop from the example's global stream position (other crops than the host's draws, as
    # reproducible): alexnet's square by a slice, inception's box resampled. For pixels of one stored shape (at
    # the crop's scale for alexnet): raw records converted with --resize=data.resize_size --center_crop
    # (data/pipeline.py device_crop_problem). Off: today's batches.
    c.data.device_crops = False
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
    c.optim.end_learning_rate_factor = 0.0  # cosine and polynomial end at learning_rate x this
    c.optim.polynomial_power = 2.0  # schedule "polynomial": learning_rate x (1 - t/T)^power after warmup
    c.optim.warmup_steps = 0
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4
    c.optim.clip_norm = 0.0
    c.optim.lars_trust_coefficient = 0.001  # optimizer "lars": a kernel's step is lr x this x its weight norm
    c.optim.label_smoothing = 0.0  # train loss only: targets (1 - s) x one-hot + s / num_classes
    # Each global batch runs as this many equal micro-batches inside the one train step, gradients averaged
    # before the single optimizer update (1 = off): same result with less memory, except that BatchNorm
    # normalises each micro-batch with its own statistics (and updates its running averages once per micro-batch).
    c.optim.grad_accum_steps = 1
    # Exponential moving average of the weights, updated in the train step with the warm-up
    # min(ema_decay, (1 + t) / (10 + t)); 0 = off. Evaluated beside the raw weights (eval_ema_* rows) and saved in
    # each checkpoint; predict/evaluate/export take --weights=ema|raw. torchvision and timm use 0.9998-0.99998.
    c.optim.ema_decay = 0.0

    # Gradient-explosion guard (alexnet_jax/stability.py). A step with a non-finite loss, gradient or update is
    # always skipped on the device; these set what the host does about it and about loss spikes.
    c.stability = ml_collections.ConfigDict()
    c.stability.layer_stats_every = 100  # per-layer grad_norm/<layer> in the train row about this often (steps)
    # A loss spike: the median loss of the last spike_recent_steps steps exceeds the median of the spike_window
    # steps before them by all of: spike_factor x that median (0: never), spike_min_delta nats, and spike_sigmas
    # robust standard deviations. Judged per step, so the log cadence does not matter; one hard batch never fires.
    c.stability.spike_factor = 2.0
    c.stability.spike_min_delta = 0.5
    c.stability.spike_sigmas = 6.0
    c.stability.spike_window = 200
    c.stability.spike_recent_steps = 10
    c.stability.max_consecutive_skips = 10  # ... or when this many steps in a row were skipped (0: never)
    c.stability.skip_batches = 200  # after a rollback, data resumes this many batches past the spike (PaLM 200-500)
    c.stability.lr_factor = 1.0  # learning rate multiplied by this at each rollback (1: unchanged)
    c.stability.max_rollbacks = 3  # the next spike stops the run (exit code 3)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.model = 1  # size of the 'model' mesh axis (splits fc6-fc8); 'data' takes the remaining devices
    c.mesh.num_slices = 1  # TPU slices (or, without slice ids, processes) joined over DCN: 'data' spans them
    c.mesh.shard_optimizer_state = False  # ZeRO-1: split momentum over 'data' too (less memory, same losses)
    return c


def follow_image_size(config, overrides, before, whose: str = "config's") -> str | None:
    """A command-line data.image_size without a command-line data.resize_size moves resize_size by `before`'s own
    ratio (the config file as written, or the checkpoint's view): 256/224 in configs/imagenet.py, 1 in
    configs/digits.py. `overrides` names the keys set on the command line; `before` is the config they were
    applied to, called only when needed. Returns the one line to log, or None when nothing follows."""
    if "data.image_size" not in overrides or "data.resize_size" in overrides:
        return None
    old = before() if callable(before) else before
    image, resize = int(old.data.image_size), int(old.data.resize_size)
    if image <= 0 or int(config.data.image_size) == image:
        return None
    followed = int(config.data.image_size) * resize // image
    if config.data.resize_size != followed:
        config.data.resize_size = followed
    return (f"data.resize_size={followed} follows data.image_size={config.data.image_size} at the {whose} "
            f"ratio {resize}/{image} (set data.resize_size to choose another)")


def _profile_range(text: str) -> tuple[int, int] | None:
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        return None
    return (start, stop) if 0 <= start < stop else None


def profile_range(config) -> tuple[int, int] | None:
    """(first, stop) steps of `profile_steps`, or None when profiling is off."""
    return _profile_range(config.profile_steps) if config.get("profile_steps") else None


def _micro_batch_problem(optim_config, batch_size: int, num_devices: int) -> str | None:
    """Why each device's rows of the batch cannot be split into optim.grad_accum_steps micro-batches, or None.
    Splitting per device keeps every micro-batch spread over all devices, with no example moving between them."""
    k, rows = optim.get(optim_config, "grad_accum_steps"), batch_size // num_devices
    if isinstance(k, int) and k > 1 and rows % k:
        return (f"optim.grad_accum_steps={k} must divide each device's {rows} examples of "
                f"batch_size={batch_size} ({num_devices} devices)")
    return None


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _mesh_problems(config, num_devices: int) -> list[str]:
    from alexnet_jax import models  # local, as in validate

    model_axis, slices = config.mesh.model, config.mesh.get("num_slices", 1)
    if model_axis < 1 or num_devices % model_axis:
        return [f"mesh.model must divide the {num_devices} devices (got {model_axis})"]
    hidden = models.hidden_features(config.model.width) if config.model.width > 0 else model_axis
    if hidden % model_axis:
        # fc6/fc7 would silently stay whole on every device: refuse rather than run a layout nobody asked for.
        return [f"mesh.model={model_axis} must divide the fc6/fc7 width {hidden} "
                f"(model.width={config.model.width})"]
    if slices < 1 or (num_devices // model_axis) % slices:
        return [f"mesh.num_slices={slices} must divide the {num_devices // model_axis} data-parallel devices"]
    import jax

    from alexnet_jax import sharding

    if num_devices == jax.device_count():  # the devices at hand: the topology itself may refuse the grid
        try:
            sharding.mesh_for(config)
        except ValueError as error:
            return [str(error)]
    return []


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1,
             splits: tuple[str, ...] = ("train", "eval")) -> None:
    """Raises ConfigError naming the first bad key, before any file is written or anything compiles. Only the
    data paths of `splits` must exist (evaluation needs no train data)."""
    # Local imports keep `import alexnet_jax.config` (done by every config file) light.
    from alexnet_jax import models, stability
    from alexnet_jax.data import pipeline

    problems = []
    m, d = config.model, config.data
    if m.variant not in models.VARIANTS:
        problems.append(f"model.variant must be one of {', '.join(models.VARIANTS)} (got {m.variant!r})")
    if m.activation not in models.ACTIVATIONS:
        problems.append(f"model.activation must be one of {', '.join(models.ACTIVATIONS)} (got {m.activation!r})")
    if m.dtype == "float16":
        problems.append("model.dtype=float16 is refused: without loss scaling its gradients underflow; use bfloat16 "
                        "(same speed on GPUs and TPUs, float32's range) or auto")
    elif m.dtype not in DTYPES:
        problems.append(f"model.dtype must be one of {', '.join(DTYPES)} (got {m.dtype!r})")
    if m.get("max_pool_grad", "auto") not in models.MAX_POOL_GRADS:
        problems.append(f"model.max_pool_grad must be one of {', '.join(models.MAX_POOL_GRADS)} "
                        f"(got {m.max_pool_grad!r})")
    if m.num_classes < 2:
        problems.append(f"model.num_classes must be >= 2 (got {m.num_classes})")
    if not m.width > 0:
        problems.append(f"model.width must be > 0 (got {m.width})")
    if not 0 <= m.dropout_rate < 1:
        problems.append(f"model.dropout_rate must be in [0, 1) (got {m.dropout_rate})")
    if d.source not in SOURCES:
        problems.append(f"data.source must be one of {', '.join(SOURCES)} (got {d.source!r})")
    elif d.source in ("imagefolder", "arrayrecord"):
        for key in (f"{split}_path" for split in splits):
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
    elif 2 * d.image_size < d.resize_size:
        problems.append(f"data.image_size={d.image_size} crops under half of data.resize_size={d.resize_size}: "
                        "set data.resize_size too (it defaults to 256/224 of data.image_size)")
    best = config.get("best_metric", "eval_top1")
    if best not in BEST_METRICS:
        problems.append(f"best_metric must be one of {', '.join(BEST_METRICS)} (got {best!r})")
    elif best == "eval_ema_top1" and not optim.get(config.optim, "ema_decay"):
        problems.append("best_metric=eval_ema_top1 needs optim.ema_decay > 0 (the weight average is off)")
    if config.get("precise_bn_examples", 0) < 0:
        problems.append(f"precise_bn_examples must be >= 0 (got {config.precise_bn_examples})")
    if d.get("device_prefetch", 0) < 0:
        problems.append(f"data.device_prefetch must be >= 0 (got {d.device_prefetch})")
    if d.workers < pipeline.AUTO_WORKERS:
        problems.append(f"data.workers must be >= 0, or -1 to choose from the cores and the run's size "
                        f"(got {d.workers})")
    if d.get("worker_threads", 0) < 0:
        problems.append(f"data.worker_threads must be >= 0 (got {d.worker_threads})")
    if d.get("worker_buffer", 1) < 1:
        problems.append(f"data.worker_buffer must be >= 1 (got {d.worker_buffer})")
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
    problems += _mesh_problems(config, num_devices)
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if key == "eval_batch_size" and value <= 0:
            continue
        if value <= 0:
            problems.append(f"{key} must be > 0 (got {value})")
        elif value % num_devices or value % num_processes:
            # The batch is split over every device, 'model' axis included (sharding.BATCH).
            problems.append(f"{key}={value} must be divisible by the {num_devices} devices"
                            f" and {num_processes} processes")
        elif key == "batch_size" and (problem := _micro_batch_problem(config.optim, value, num_devices)):
            problems.append(problem)
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        problems.append("num_epochs must be > 0 when num_train_steps <= 0")
    if config.profile_steps and not _profile_range(config.profile_steps):
        problems.append(f"profile_steps must be 'A:B' with 0 <= A < B (got {config.profile_steps!r})")
    for key in ("log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep"):
        if config[key] <= 0:
            problems.append(f"{key} must be > 0 (got {config[key]})")
    if config.get("workdir_lock_timeout_s", 1) <= 0:
        problems.append(f"workdir_lock_timeout_s must be > 0 (got {config.workdir_lock_timeout_s})")
    problems += optim.validate_optim_config(config.optim)
    problems += stability.validate_stability_config(config.stability)
    if problems:
        raise ConfigError(problems[0])
