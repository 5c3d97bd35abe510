"""What every command line shares: flag errors become one `error:` line and exit code 2, as the README promises;
the multi-process flags of the commands that may run on several hosts."""

import sys

import jax
from absl import app, flags

EXIT_BAD_USAGE = 2


def _message(error: Exception, argv: list[str]) -> str:
    # KeyError's str() is the repr of its message; the message itself reads better.
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error).strip()
    if isinstance(error, (KeyError, AttributeError)):  # ml_collections: an override naming an unknown key
        key = text.splitlines()[0].strip("'\" ") if text else "?"
        named = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
        hint = " ".join(text.splitlines()[1:]).strip()
        return f"{named[0] if named else key}: no such config key" + (f" ({hint})" if hint else "")
    return " ".join(text.split()) if text else type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, except that a bad flag, a missing required flag, an unreadable config file or an unknown
    `--config.key` exits 2 with one line instead of absl's exit 1 (or a traceback for config files)."""
    try:
        remaining = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
            flags.FLAGS.config.keys()  # config_flags defers a config file's load error to first use: force it
        return remaining
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        print(f"error: {_message(error, argv)}", file=sys.stderr)
        print("Run with --help to see the flags.", file=sys.stderr)
        sys.exit(EXIT_BAD_USAGE)


def run(main) -> None:
    app.run(main, flags_parser=parse_flags)


def define_distributed_flags() -> None:
    """The multi-process flags of every command that may run on several hosts at once (main, evaluate)."""
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs.")
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
    flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() with auto-detection (TPU pods, "
                      "SLURM). Default: only when --coordinator_address is given.")


def init_distributed() -> None:
    """Joins the other processes as the flags of `define_distributed_flags` say; a single process otherwise."""
    FLAGS = flags.FLAGS
    if FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
        # CPU-only clusters (and our loopback tests) need a cross-process collectives backend; accelerators
        # bring their own (NCCL, ICI), so this only affects the CPU platform.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()
