"""Train AlexNet: python -m alexnet_jax.main --config=configs/imagenet.py --workdir=DIR [--config.key=value ...]

Rerunning the same command resumes from the newest checkpoint in DIR. Multi-process runs pass
--coordinator_address/--num_processes/--process_id, or --distributed alone on TPU pod slices and SLURM, where
jax.distributed.initialize() detects the cluster itself.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import config as config_lib
from alexnet_jax import cli, metrics, stability, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])

EXIT_BAD_CONFIG = 2
EXIT_STABILITY_STOP = 3  # the gradient-explosion guard gave up (see stability.py)
EXIT_PREEMPTED = 128 + 15  # what a shell reports for SIGTERM: schedulers treat it as "terminated", so requeue


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    metrics.quiet_library_logs()
    cli.init_distributed()
    config = FLAGS.config
    try:
        config_lib.validate(config, jax.device_count(), jax.process_count())
    except config_lib.ConfigError as error:
        print(f"error: config: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    logging.info("JAX %s on %d %s device(s), process %d of %d", jax.__version__, jax.device_count(),
                 jax.devices()[0].platform, jax.process_index(), jax.process_count())
    try:
        train.train_and_evaluate(config, FLAGS.workdir)
    except config_lib.ConfigError as error:  # found only once the data is opened (e.g. too many classes)
        print(f"error: config: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except stability.TrainingStopped as stop:
        print(f"error: {stop}", file=sys.stderr)
        return EXIT_STABILITY_STOP
    except train.Preempted as stop:
        logging.warning("Preempted: %s", stop)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    cli.run(main)
