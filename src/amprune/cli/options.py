"""Options shared by the subcommands, the parser that reports a bad one in one line, and the request
built from them by field name."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

MODEL_HELP = "HF folder, .gguf file, hub id, or gemma3-270m (the packaged Gemma-3-270M); default: the packaged " \
             "SmolLM2-135M-Instruct"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DTYPES = ("float32", "bfloat16", "float16")


class Parser(argparse.ArgumentParser):
    """One line for every bad option (naming the flag and what it accepts), exit 2: no usage dump."""

    def error(self, message: str):
        self.exit(2, f"amprune: error: {' '.join(message.split())}\n")


def _split(values) -> list[str]:
    """`a,b c` → [a, b, c]: every list option takes commas, spaces or both."""
    values = [values] if isinstance(values, str) else values
    return [item for value in values for item in value.split(",") if item]


class ListAction(argparse.Action):
    def __init__(self, option_strings, dest, item=str, **kwargs):
        self.item = item
        super().__init__(option_strings, dest, nargs="+", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, [self.item(v) for v in _split(values)])
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument {option_string}: {err}")
        except (TypeError, ValueError):
            parser.error(f"argument {option_string}: not a list of {self.item.__name__} values: {' '.join(values)}")


class Deprecated(argparse.Action):
    """A former option name: stores into the new option, with a warning (hidden from --help)."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        notices = getattr(namespace, "deprecated", None) or []
        namespace.deprecated = [*notices, f"{option_string} is deprecated: use {self.new}"]
        setattr(namespace, self.dest, values if self.nargs != 0 else self.const)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n' if kind is int else ''} {kind.__name__}: {text}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


_fraction.__name__ = "fraction in [0, 1)"
POSITIVE_INT, POSITIVE_FLOAT = _positive(int), _positive(float)


def defaults_in_help(parser, cls) -> None:
    """Append "(default: X)" to every option that fills a field of `cls` with a default, from the dataclass
    itself, so help and behaviour cannot drift apart."""
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING and f.default is not None}
    defaults.update({f.name: f.default_factory() for f in fields(cls) if f.default_factory is not MISSING})
    for action in parser._actions:
        if action.dest in defaults and action.help not in (None, argparse.SUPPRESS) and "default:" not in action.help:
            value = defaults[action.dest]
            if isinstance(value, bool):
                continue
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            action.help += f" (default: {shown})"


def request(cls, args):
    """A request of dataclass `cls` from the parsed options, by field name; an option left out (None) takes
    the dataclass default."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    return cls(**given)


def logging_group(parser, suppress: bool) -> None:
    """--quiet and --log-level: on the top level and on every subcommand (so they go anywhere)."""
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("logging")
    group.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                       help="no progress bars, warnings only")
    group.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=default,
                       help="default: INFO")


def runtime_group(parser, threads: bool = False):
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    group.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's own (prune), float32 on CPU and "
                       "bfloat16 on CUDA (the others)")
    if threads:
        group.add_argument("--threads", type=POSITIVE_INT, help="torch CPU threads (default: torch's choice)")
    return group


def calibration_group(parser, recipe: bool = False):
    """Where calibration (or training) samples come from; with `recipe`, the defaults are the recipe's."""
    group = parser.add_argument_group("calibration")
    recipe_note = " (default: the recipe's)" if recipe else ""
    group.add_argument("--calib", help="mix (equal shares of each) | c4 | wiki | c4,wiki (pooled): the packaged "
                       f"texts' calibration halves; or a .txt / .jsonl file{recipe_note}")
    group.add_argument("--samples", type=POSITIVE_INT, help=f"calibration samples{recipe_note}")
    group.add_argument("--seq-len", type=POSITIVE_INT, help="tokens per sample")
    group.add_argument("--seed", type=int, help="seed for drawing the samples")
    group.add_argument("--batch-size", type=POSITIVE_INT, help="samples per forward pass")
    return group


def evaluation_group(parser, title: str = "evaluation"):
    from ..evaluation import ALIASES, TASKS

    group = parser.add_argument_group(title)
    group.add_argument("--tasks", action=ListAction, help=f"zero-shot tasks: {', '.join(TASKS)}, or the aliases "
                       f"{', '.join(ALIASES)}")
    group.add_argument("--limit", type=POSITIVE_INT, help="first N documents of each task (default: all); stated "
                       "in every output")
    group.add_argument("--eval-batch-size", type=POSITIVE_INT, help="lm-eval batch size")
    group.add_argument("--ppl", action=ListAction, help="perplexity texts: wiki, c4 (the packaged texts' halves "
                       "calibration never uses) or .txt files")
    group.add_argument("--ppl-seq-len", type=POSITIVE_INT, help="tokens per perplexity window: 128 as "
                       "LLM-Pruner/FLAP, 2048 as SliceGPT/AMP (default: 2048, or the model's maximum context)")
    group.add_argument("--ppl-windows", type=POSITIVE_INT, help="at most N perplexity windows (default: all)")
    return group
