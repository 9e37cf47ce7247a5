"""``python -m serving.store``: look at the model store and change what is served.

    list                      every kept version of every model, and which one is served
    promote MODEL VERSION     serve VERSION of MODEL (a kept version; the gate is not asked)
    rollback MODEL            serve the version that was promoted before the current one
    keygen                    create the signing key pair if there is none
    accept-manifest           take the manifest now in MODELS_DIR as the last one written
                              (after restoring the store from a backup; writers refuse to
                              build on any other)

``MODELS_DIR``, ``MODEL_SIGNING_KEY_FILE`` and ``MODEL_PUBLIC_KEY_FILE`` say where the store and
the keys are (defaults: ``shared_models/`` and ``airflow/home/model-signing/``). Promoting and
rolling back write a new signed manifest; the service follows within a second.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
from pathlib import Path

from serving.settings import DEFAULT_MODELS_DIR
from serving.store import signing
from serving.store.documents import ModelEntry
from serving.store.layout import MODEL_NAME, StoreError
from serving.store.reader import Trust, read_manifest, read_metadata, version_ids
from serving.store.writer import accept_manifest, change_manifest, promoted, rolled_back


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.store",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every kept version, and which one is served")
    promote = commands.add_parser("promote", help="serve a kept version of a model")
    promote.add_argument("model")
    promote.add_argument("version")
    rollback = commands.add_parser("rollback", help="serve the previously promoted version")
    rollback.add_argument("model")
    commands.add_parser("keygen", help="create the signing key pair if there is none")
    commands.add_parser("accept-manifest",
                        help="take the manifest now in MODELS_DIR as the last one written")
    args = parser.parse_args(argv)
    models_dir = Path(os.environ.get("MODELS_DIR") or DEFAULT_MODELS_DIR)
    try:
        if args.command == "keygen":
            return _keygen()
        if args.command == "list":
            return _list(models_dir)
        if args.command == "accept-manifest":
            sequence = accept_manifest(models_dir)
            print(f"{models_dir}: writers now build on manifest sequence {sequence}")
            return 0
        return _change(models_dir, args)
    except (StoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _keygen() -> int:
    private, public = signing.private_key_file(), signing.public_key_file()
    created = signing.ensure_key_pair(private, public)
    key = signing.load_public_key(public)
    print(f"{'created' if created else 'kept'} the key pair {signing.key_id(key)}: private key "
          f"{private} (only for the pipeline), public key {public}")
    return 0


def _list(models_dir: Path) -> int:
    trust = Trust(signing.load_public_key(signing.public_key_file()))
    manifest = read_manifest(models_dir, trust)
    print(f"MODELS_DIR {models_dir}: manifest sequence {manifest.sequence}, best model "
          f"{manifest.best_model or '-'}")
    names = sorted({*manifest.models, *_model_folders(models_dir)})
    for model in names:
        entry = manifest.models.get(model, ModelEntry())
        print(f"\n{model}")
        for version in reversed(version_ids(models_dir, model)):
            state, reason = entry.state_of(version)
            try:
                info = read_metadata(models_dir, model, version, trust)
                metrics = info.metadata["metrics"]
                detail = (f"accuracy {metrics['accuracy']:.4f}  f1 {metrics['f1_macro']:.4f}  "
                          f"trained {info.metadata.get('trained_at')}  run "
                          f"{info.metadata.get('dag_run_id')}")
            except (OSError, StoreError) as exc:
                state, detail = "refused", str(exc)
            print(f"  {version}  {state:<10} {detail}")
            if reason:
                print(f"  {'':23}  held back: {reason}")
    return 0


def _change(models_dir: Path, args: argparse.Namespace) -> int:
    key = signing.load_private_key(signing.private_key_file())
    trust = Trust(key.public_key())

    def change(manifest):
        entries = dict(manifest.models)
        entry = entries.get(args.model)
        if args.command == "promote":
            changed = promoted(entry or ModelEntry(), args.version)
        elif entry is None:
            raise StoreError(f"the manifest does not list {args.model}")
        else:
            changed = rolled_back(entry, args.model)
        # Under the store's lock: the version to serve is there and verifies.
        read_metadata(models_dir, args.model, changed.promoted, trust)
        entries[args.model] = changed
        return entries

    who = f"python -m serving.store {args.command} by {getpass.getuser()}@{socket.gethostname()}"
    manifest = change_manifest(models_dir, key, change, written_by=who)
    print(f"{args.model}: serving {manifest.models[args.model].promoted} (manifest sequence "
          f"{manifest.sequence})")
    return 0


def _model_folders(models_dir: Path) -> list[str]:
    try:
        return [e for e in os.listdir(models_dir) if MODEL_NAME.fullmatch(e)
                and (models_dir / e).is_dir() and not (models_dir / e).is_symlink()]
    except FileNotFoundError:
        return []


if __name__ == "__main__":
    sys.exit(main())
