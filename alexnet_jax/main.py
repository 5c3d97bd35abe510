"""Train AlexNet: python -m alexnet_jax.main --config=configs/imagenet.py --workdir=DIR [--config.key=value ...]

Every config key can be overridden with --config.KEY=VALUE; --show_config prints them all with their values
(keys are described in alexnet_jax/config.py and the README). Rerunning the same command resumes from the
newest checkpoint in DIR; Ctrl-C or SIGTERM checkpoints the current step and stops (exit 130 or 143). Multi-process runs pass
--coordinator_address/--num_processes/--process_id, or --distributed alone on TPU pod slices and SLURM, where
jax.distributed.initialize() detects the cluster itself.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import config as config_lib
from alexnet_jax import checkpointing, cli, metrics, stability, storage, train, workdir_lock

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
cli.define_distributed_flags()
flags.DEFINE_bool("show_config", False, "Print every config key with its value (after --config.* overrides) "
                  "and exit.")
flags.mark_flags_as_required(["config"])

EXIT_BAD_CONFIG = 2
EXIT_STABILITY_STOP = 3  # the gradient-explosion guard gave up (see stability.py)
EXIT_CHECKPOINT_NOT_WRITTEN = 4  # disk full, storage refused a write; earlier checkpoints are intact
EXIT_PREEMPTED = 128 + 15  # what a shell reports for SIGTERM: schedulers treat it as "terminated", so requeue
EXIT_INTERRUPTED = 128 + 2  # Ctrl-C, as a shell reports it


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    config_flag = FLAGS["config"]
    if note := config_lib.follow_image_size(config, config_flags.get_override_values(config_flag),
                                            lambda: config_flag.parser.parse(config_flag.config_filename)):
        logging.info("%s", note)
    if FLAGS.show_config:
        print(config)
        return 0
    if not FLAGS.workdir:
        print("error: flag --workdir must be given (where checkpoints and metrics go)", file=sys.stderr)
        return EXIT_BAD_CONFIG
    problem = storage.unwritable(FLAGS.workdir)
    if problem:
        print(f"error: --workdir: {problem}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    metrics.quiet_library_logs()
    cli.enable_compilation_cache(config.get("compilation_cache_dir", ""))
    try:
        cli.init_distributed()
    except (ValueError, RuntimeError) as error:  # e.g. --distributed where no cluster can be detected
        print(f"error: cannot start the multi-process runtime: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        config_lib.validate(config, jax.device_count(), jax.process_count())
    except config_lib.ConfigError as error:
        print(f"error: config: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    logging.info("JAX %s on %d %s device(s), process %d of %d", jax.__version__, jax.device_count(),
                 jax.devices()[0].platform, jax.process_index(), jax.process_count())
    try:
        # Before train_and_evaluate writes anything: two trainers in one workdir would destroy each other's work.
        with workdir_lock.hold(FLAGS.workdir, config.get("workdir_lock_timeout_s", workdir_lock.DEFAULT_TIMEOUT_S)):
            train.train_and_evaluate(config, FLAGS.workdir)
    except workdir_lock.LockError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except config_lib.ConfigError as error:  # found only once the data is opened (e.g. too many classes)
        print(f"error: config: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except checkpointing.CheckpointWriteFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return cli.exit_leaving_stranded_threads(EXIT_CHECKPOINT_NOT_WRITTEN)
    except checkpointing.CheckpointUnreadable as error:  # nothing was moved: the user decides
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except stability.TrainingStopped as stop:
        print(f"error: {stop}", file=sys.stderr)
        return EXIT_STABILITY_STOP
    except train.Preempted as stop:
        interrupted = stop.signal_name == "SIGINT"  # Ctrl-C is the user's stop, not a preemption
        logging.warning("%s: %s", "Interrupted" if interrupted else "Preempted", stop)
        return EXIT_INTERRUPTED if interrupted else EXIT_PREEMPTED
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("error: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    cli.run(main)
