"""The model initializer: `python -m medmo_trainer.fetch --model ORG/NAME --to URI [--revision REV]`.

Downloads a Hugging Face Hub model once, with `huggingface_hub.snapshot_download` (`HF_ENDPOINT`
picks the hub or a mirror, `HF_TOKEN` is the token for a gated or private model), and copies it
into the run's storage, where every pod of every stage then loads it by URI. The operator runs it as
one Job before a run's first stage (as Kubeflow Trainer's model initializer does).

`config.json` is copied last: loaders take a folder holding it as complete, so a copy cut short is
never loaded. Exit codes (`medmo_trainer.exit_codes`): MODEL_INVALID when the hub has no such model
or revision (404), MODEL_ACCESS_DENIED when it refuses it (401/403: gated or private), both final;
MODEL_HUB_UNAVAILABLE (network, 5xx) and STORAGE_UNAVAILABLE are worth a retry. No torch import:
the initializer starts fast. The token is never printed: messages name the model and the endpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import sys
import tempfile
from pathlib import Path

from medmo_trainer.entrypoint import classify, write_termination_message
from medmo_trainer.exit_codes import ExitCode, ModelAccessDeniedError, ModelError, ModelHubUnavailableError, StorageError
from medmo_trainer.fsio import url_to_fs

logger = logging.getLogger(__name__)

HUB_METADATA_DIR = ".cache"
"""Where `snapshot_download(local_dir=...)` keeps its own bookkeeping: not part of the model."""


def fetch_model(repo_id: str, target: str, revision: str | None = None) -> str:
    """Downloads `repo_id` from the hub and copies it to `target` (any fsspec URI); returns a summary."""
    with tempfile.TemporaryDirectory(prefix="medmo-fetch-") as tmp:
        folder = download(repo_id, revision, Path(tmp))
        files, size = copy_to_storage(folder, target)
    return f"model {repo_id!r} ({revision or 'main'}) copied to {target}: {files} files, {size / 2**20:.1f} MiB"


def download(repo_id: str, revision: str | None, into: Path) -> Path:
    """The model's files in a local folder; a failure is raised as the StageError of its class."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # one line per file would bury the log
    where = f"{repo_id!r} (revision {revision or 'main'}) on {constants.ENDPOINT}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_dir=into / "model", cache_dir=into / "hub-cache"))
    except Exception as error:  # noqa: BLE001 (classified below, by the hub's answer)
        raise _classified(error, where) from error


def _classified(error: Exception, where: str) -> Exception:
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    if isinstance(error, RevisionNotFoundError):
        return ModelError(f"model {where} not found: the hub has no such revision (404)")
    # snapshot_download turns some refusals into LocalEntryNotFoundError ("not in the local cache either"):
    # the hub's answer is the cause.
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, HfHubHTTPError):
        cause = cause.__cause__ or cause.__context__
    status = cause.response.status_code if cause is not None and cause.response is not None else None
    if status in (401, 403):
        return ModelAccessDeniedError(
            f"model {where} is gated or private: the hub answered {status}; put a token with access to it "
            "in a Secret and name it in model.tokenSecretRef"
        )
    if status == 404:
        return ModelError(f"model {where} not found: the hub answered 404; check model.base")
    reason = f"the hub answered {status}" if status else f"{type(error).__name__}: {error}"
    return ModelHubUnavailableError(f"cannot download model {where}: {reason}")


def copy_to_storage(folder: Path, target: str) -> tuple[int, int]:
    """Copies a downloaded model folder to `target`, `config.json` last; returns (files, bytes)."""
    files = [
        path for path in folder.rglob("*")
        if path.is_file() and path.relative_to(folder).parts[0] != HUB_METADATA_DIR
    ]
    # The top-level config.json last: its presence is what marks the copy complete.
    files.sort(key=lambda path: (path.relative_to(folder).as_posix() == "config.json", path.as_posix()))
    if not any(path.relative_to(folder).as_posix() == "config.json" for path in files):
        raise ModelError(f"the downloaded model holds no config.json (files: {[p.name for p in files][:20]})")
    try:
        fs, root = url_to_fs(target)
        root = root.rstrip("/")
        if fs.exists(root):
            fs.rm(root, recursive=True)  # an interrupted attempt's partial copy
        for path in files:
            destination = f"{root}/{path.relative_to(folder).as_posix()}"
            fs.makedirs(posixpath.dirname(destination), exist_ok=True)
            fs.put_file(str(path), destination)
    except OSError as error:
        raise StorageError(f"copying the model to {target} failed: {error}") from error
    return len(files), sum(path.stat().st_size for path in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medmo_trainer.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face Hub id, e.g. Qwen/Qwen3-VL-8B-Instruct")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--to", required=True, help="where the model goes: a folder URI in the run's storage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = "a token" if os.environ.get("HF_TOKEN") else "no token"
    logger.info("fetching model %r (revision %s) into %s, with %s", args.model, args.revision or "main", args.to, token)
    try:
        summary = fetch_model(args.model, args.to, args.revision)
    except Exception as error:  # every failure leaves an exit code and a message
        code = classify(error)
        logger.error("%s", error)
        write_termination_message(f"{code.name} (exit {int(code)}): {error}")
        return int(code)
    logger.info("%s", summary)
    write_termination_message(f"OK: {summary}")
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
