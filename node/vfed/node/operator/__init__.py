"""The node operator's commands (`vnode new|keys|trust|untrust|users|datasets|leases|ledger|start|stop|list|
attach|files|clean|logs`), a module per group."""

from __future__ import annotations

import click

from vfed.node.operator.api_key import api_key_command
from vfed.node.operator.datasets import datasets_group
from vfed.node.operator.keys import keys_group
from vfed.node.operator.leases import leases_group
from vfed.node.operator.ledger import ledger_group
from vfed.node.operator.lifecycle import attach_command, clean_command, start_command, stop_command
from vfed.node.operator.listing import files_command, list_command
from vfed.node.operator.new import new_command
from vfed.node.operator.run_logs import logs_command
from vfed.node.operator.trust import trust_command, untrust_command
from vfed.node.operator.users import users_group

COMMANDS: list[click.Command] = [
    new_command,
    keys_group,
    trust_command,
    untrust_command,
    users_group,
    datasets_group,
    leases_group,
    ledger_group,
    start_command,
    stop_command,
    list_command,
    attach_command,
    files_command,
    clean_command,
    api_key_command,
    logs_command,
]

__all__ = ["COMMANDS"]
