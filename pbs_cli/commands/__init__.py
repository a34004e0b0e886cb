"""One module per `pbs` command."""
