"""The `pipeline` command: parse arguments, call the package, turn known errors into exit codes.

    pipeline train conf/fashion_mnist_cnn.yaml train.epochs=3 scaling.num_workers=2
    python -m pipeline train conf/linear_regression.yaml --output json

Exit codes: 0 done, 1 training failed, 2 bad input (config, data, arguments), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import ConfigError, load_config

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one experiment (resumes from its latest checkpoint)")
    train.add_argument("conf", help="experiment YAML, e.g. conf/fashion_mnist_cnn.yaml")
    train.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. optim.lr=0.01 train.epochs=3")
    train.add_argument("--fresh", action="store_true", help="delete this run's checkpoints and start over")
    train.add_argument("--dry-run", action="store_true", help="1 epoch over 4 batches, as run NAME-dry-run: a quick check")
    train.add_argument("--output", choices=("text", "json"), default="text", help="json: one JSON object, last line of stdout")
    train.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _train(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the latest checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.conf, args.overrides)  # before importing torch or Ray: bad input fails fast
    if args.dry_run:
        cfg = cfg.dry_run()
    from pipeline.console import TrainingDisplay, print_summary
    from pipeline.data import DataError
    from pipeline.train import run_training, training_failure

    try:
        with TrainingDisplay(cfg.train.epochs) as display:
            result = run_training(cfg, fresh=args.fresh or args.dry_run, on_event=display, verbose=args.verbose)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - Ray wraps worker errors; say what failed, without Ray's stack
        message = training_failure(err)
        if message is None:
            raise
        print(f"error: training failed: {message}", file=sys.stderr)
        return EXIT_FAILED
    if args.output == "json":
        print(json.dumps(result.summary()))
    else:
        print_summary(result.summary())
    return 0
