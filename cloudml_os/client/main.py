"""The ``cloudml`` command tree (``cloudml NOUN VERB``), and its entry point :func:`main`.

Nouns are loaded when used (:class:`LazyGroup`): ``cloudml jobs list`` imports the jobs commands only,
which keeps every call, and each shell completion, quick. Nothing here may import the server side.
"""

from __future__ import annotations

import importlib

import click

from cloudml_os import __version__
from cloudml_os.client.context import global_options

# noun -> "module:attribute" of its Click group (or command)
COMMANDS = {
    "auth": "cloudml_os.client.configure:auth_group",
    "config": "cloudml_os.client.configure:config_group",
    "jobs": "cloudml_os.client.jobs:jobs_group",
    "local": "cloudml_os.client.local:local",
    "models": "cloudml_os.client.models:models_group",
    "objects": "cloudml_os.client.objects:objects_group",
    "operations": "cloudml_os.client.models:operations_group",
    "predict": "cloudml_os.client.models:predict",
    "versions": "cloudml_os.client.models:versions_group",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported from :data:`COMMANDS` when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cloudml")
@global_options
def cli() -> None:
    """cloudml: train and serve models on cloudml-os, as `gcloud ai-platform` does on Cloud ML Engine.

    \b
    cloudml config set endpoint http://127.0.0.1:8080
    cloudml config set project demo
    cloudml config set token -        # paste a token made with `cloudml-os token create`
    cloudml jobs submit training census_1 --package-path examples/tensorflow \\
        --module-name trainer.task --stream-logs -- --epochs 2

    Results go to stdout (--format json, yaml, table, value(field,...)); messages and progress to stderr.
    Errors exit 1 (2 for a usage error). Shell completion: eval "$(_CLOUDML_COMPLETE=bash_source cloudml)"
    (zsh: zsh_source). See docs/cli.md.
    """


def main() -> None:
    cli.main(prog_name="cloudml")


if __name__ == "__main__":
    main()
