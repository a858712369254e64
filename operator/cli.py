"""The `medmo` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from medmo_operator import api


def load_training_file(path: Path) -> api.MedMOTraining:
    """Reads and validates a MedMOTraining YAML file; raises SystemExit with the field errors."""
    try:
        obj = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"{path}: cannot read the resource: {error}") from error
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: expected one MedMOTraining object, got {type(obj).__name__}")
    try:
        return api.parse_training(obj)
    except ValidationError as error:
        raise SystemExit(f"{path}: invalid MedMOTraining:\n{api.format_validation_error(error)}") from error


def _validate(args: argparse.Namespace) -> int:
    training = load_training_file(args.file)
    stages = ", ".join(f"{stage.name} ({stage.type})" for stage in training.spec.stages)
    print(f"{args.file}: valid MedMOTraining {training.metadata.name!r}: {stages}")
    return 0


def _operator(args: argparse.Namespace) -> int:
    import kopf

    from medmo_operator import handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=args.liveness,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmo", description="Train MedMO-style medical vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check a MedMOTraining YAML file against the API")
    validate.add_argument("file", type=Path)
    validate.set_defaults(handler=_validate)
    operator = commands.add_parser("operator", help="run the operator against the cluster of $KUBECONFIG (or in-cluster)")
    operator.add_argument("--namespace", action="append", help="watch only this namespace (repeatable); default: all")
    operator.add_argument("--liveness", default=None, help="serve kopf's liveness probe, e.g. http://0.0.0.0:8081/healthz")
    operator.add_argument("--verbose", action="store_true")
    operator.set_defaults(handler=_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
