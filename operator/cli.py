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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmo", description="Train MedMO-style medical vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check a MedMOTraining YAML file against the API")
    validate.add_argument("file", type=Path)
    validate.set_defaults(handler=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
