"""What every command line shares: flag errors become one `error:` line and exit code 2, as the README promises;
the multi-process flags of the commands that may run on several hosts."""

import os
import re
import sys
import threading
import time

import jax
from absl import app, flags, logging

EXIT_BAD_USAGE = 2


def _unknown_key(text: str, argv: list[str]) -> str:
    """'no config key model.widht (did you mean model.width?)' from ml_collections' message, which names only the
    last part of the key, and the override on the command line that it came from."""
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    bad = suggestion.group(2) if suggestion else (re.findall(r"[\w-]+", text) or ["?"])[0]
    for arg in argv:
        parts = arg.split("=", 1)[0].removeprefix("--config.").split(".")
        if arg.startswith("--config.") and bad in parts:
            parents = parts[:parts.index(bad)]
            hint = f" (did you mean {'.'.join([*parents, suggestion.group(1)])}?)" if suggestion else ""
            return f"no config key {'.'.join([*parents, bad])}{hint}"
    return f"no config key {bad}"


def _message(error: Exception, argv: list[str]) -> str:
    # KeyError's str() is the repr of its message; the message itself reads better.
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error).strip()
    if isinstance(error, (KeyError, AttributeError)):  # ml_collections: an override naming an unknown key
        return _unknown_key(text, argv)
    return " ".join(text.split()) if text else type(error).__name__


def _config_file_arg(argv: list[str]) -> str | None:
    """The file named by --config (without a `:argument` for get_config), if the command line names one."""
    for i, arg in enumerate(argv):
        name, _, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "config":
            value = value if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            return value.split(":", 1)[0]
    return None


def _chain(error: BaseException):
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        yield error
        error = error.__cause__ or error.__context__


def _config_file_problem(error: BaseException, argv: list[str]) -> str | None:
    """'config file F: why' when `error` comes from loading the --config file, else None.

    ml_collections executes the file as Python and calls its get_config(); what goes wrong there reaches us
    as whatever the file raised, wrapped (ValueError/TypeError, with the traceback as text) or deferred (a
    missing file, as an IOError at first use), so the cause is found in the exception chain."""
    path = _config_file_arg(argv)
    if not path:
        return None
    if not os.path.exists(path):
        return f"config file {path}: no such file"
    if os.path.isdir(path):
        return f"config file {path}: is a directory"
    where = os.path.realpath(path)
    not_python = "" if path.endswith(".py") else (
        " (config files are Python modules that define get_config(), like configs/digits.py)")
    for cause in _chain(error):
        if isinstance(cause, SyntaxError) and cause.filename and os.path.realpath(cause.filename) == where:
            return f"config file {path}: syntax error at line {cause.lineno}: {cause.msg}{not_python}"
        if isinstance(cause, AttributeError) and getattr(cause, "name", None) == "get_config":
            return f"config file {path}: defines no get_config(){not_python}"
        lines = [frame.tb_lineno for frame in _frames(cause.__traceback__)
                 if os.path.realpath(frame.tb_frame.f_code.co_filename) == where]
        if lines:
            text = " ".join(str(cause).split())[:300]
            return f"config file {path}: line {lines[-1]}: {type(cause).__name__}{': ' + text if text else ''}"
        if isinstance(cause, OSError) and cause.errno is not None:  # e.g. a file this process may not read
            return f"config file {path}: {cause.strerror}"
    if any("Error whilst parsing config file" in str(cause) for cause in _chain(error)):
        first = list(_chain(error))[-1]  # e.g. get_config() refused the `:argument`
        return f"config file {path}: {type(first).__name__}: {' '.join(str(first).split())[:300]}"
    return None


def _frames(traceback):
    while traceback is not None:
        yield traceback
        traceback = traceback.tb_next


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, except that a bad flag, a missing required flag, a config file that fails to load or an
    unknown `--config.key` exits 2 with one line instead of absl's exit 1 (or a traceback for config files)."""
    try:
        remaining = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
            flags.FLAGS.config.keys()  # config_flags defers a config file's load error to first use: force it
        return remaining
    except Exception as error:  # noqa: BLE001 - a config file may raise anything; others are re-raised
        problem = _config_file_problem(error, argv)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(EXIT_BAD_USAGE)
        if not isinstance(error, (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)):
            raise
        print(f"error: {_message(error, argv)}", file=sys.stderr)
        if isinstance(error, (KeyError, AttributeError)) and "show_config" in flags.FLAGS:
            print("List the config keys with --config=FILE --show_config.", file=sys.stderr)
        else:
            print("Run with --help to see the flags.", file=sys.stderr)
        sys.exit(EXIT_BAD_USAGE)


def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory` (the `compilation_cache_dir` config key): a rerun, a
    resume or another process of the same program loads its executables instead of compiling them again. The
    JAX_COMPILATION_CACHE_DIR environment variable, when set, wins; "" leaves the cache off."""
    if directory and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        import jax

        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))


def run(main) -> None:
    """absl's app.run, with library chatter (a missing TPU backend, Orbax's read-only notes) kept off the console
    and a usage error (a stray positional argument) as one `error:` line and exit code 2, not the whole help."""
    def main_with_usage_errors(argv):
        from alexnet_jax import metrics

        metrics.quiet_library_logs()
        try:
            return main(argv)
        except app.UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            print("Run with --help to see the flags.", file=sys.stderr)
            return EXIT_BAD_USAGE

    app.run(main_with_usage_errors, flags_parser=parse_flags)


def exit_leaving_stranded_threads(code: int, grace_s: float = 10.0) -> int:
    """Returns `code` once the other non-daemon threads finish; if some are still running after `grace_s`,
    exits with `code` at once instead (os._exit) rather than wait for them.

    Why: when storage refuses a checkpoint write half-way, Orbax's later write phases run in non-daemon threads
    that wait for a signal from the phase that failed; it never comes, and Python's exit would join them until
    Orbax's coordination timeout (many minutes), after the error was already reported. Everything the trainer
    owns was closed by then: what is skipped is only those threads (and atexit hooks)."""
    deadline = time.monotonic() + grace_s
    current = threading.current_thread()
    others = [t for t in threading.enumerate() if t is not current and not t.daemon]
    for thread in others:
        # threading.Thread.join itself: subclasses (Orbax's) may raise from an override when the wait times out
        threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))
    stranded = [t.name for t in others if t.is_alive()]
    if not stranded:
        return code
    logging.warning("Exiting without waiting for %d stalled checkpoint-writer thread(s) (%s)", len(stranded),
                    ", ".join(sorted(set(stranded))))
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def define_weights_flag() -> None:
    """--weights of the commands that load a checkpoint for inference (predict, evaluate, export)."""
    flags.DEFINE_enum("weights", None, ["raw", "ema"], "Which weights of the checkpoint to use: the trained ones "
                      "(raw) or their moving average (ema, with optim.ema_decay > 0); default: the ones the run's "
                      "best_metric ranks checkpoints by.")


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
