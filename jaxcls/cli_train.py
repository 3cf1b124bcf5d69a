"""Placeholder until this feature's subcommands land."""


def register(sub) -> None:
    pass
