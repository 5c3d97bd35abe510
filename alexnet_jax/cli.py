"""What every command line shares: flag errors become one `error:` line and exit code 2 (DESIGN's contract)."""

import sys

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
