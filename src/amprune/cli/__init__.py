"""The `amprune` command line: argparse wiring around the library.

Every subcommand has one request dataclass that holds its defaults and its checks (`PruneRequest`,
`EvalRequest`, …). The parser is built from argument groups the subcommands share (`options`); an option
left out is None, so the request's own default applies, and the request is filled from the parsed
options by field name. Options a release renamed are hidden aliases that still work, with a deprecation
warning. `prune.py` wires prune, inspect and list; `tools.py` eval, compare, bench, recover and export.
"""

from __future__ import annotations

import logging
import os
import sys

from .. import distributed
from ..errors import AmpruneError
from .options import Parser, logging_group
from .prune import add_inspect, add_list, add_prune
from .tools import add_bench, add_compare, add_eval, add_export, add_recover

logger = logging.getLogger("amprune")

SUBCOMMANDS = (add_prune, add_eval, add_compare, add_bench, add_recover, add_export, add_inspect, add_list)


def build_parser() -> Parser:
    from ..models import FAMILIES

    families = ", ".join(t for f in FAMILIES for t in f.model_types)
    parser = Parser(prog="amprune", description="Structured pruning of LLMs (attention heads, MLP neurons, whole "
                    f"layers) into standard checkpoints. Families: {families}.")
    logging_group(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in SUBCOMMANDS:
        add(sub)
    for subparser in sub.choices.values():  # global options anywhere on the line
        logging_group(subparser, suppress=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad option, already reported in one line (2)
        return int(stop.code or 0)
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 alone reports
        args.quiet = True
    level = "WARNING" if args.quiet else args.log_level or "INFO"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for notice in getattr(args, "deprecated", None) or []:  # options read before logging was set up
        logger.warning(notice)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        args.handler(args)
    except AmpruneError as err:
        print(f"amprune: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
