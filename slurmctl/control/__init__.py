"""Operating jobs: start, resume, retry, aggregate, pause, change a rate, cancel.

What the ``slurmctl`` command and the Python API (``slurmctl.api``) share, so no logic lives only in the CLI. The
functions here act and raise (``slurmctl.control.errors``: each error's message is the one the CLI prints, its
``exit_code`` the one the CLI exits with); they write progress notes to stderr as the commands always have, and
leave watching and printing results to their callers. Like ``slurmctl.cli``, this layer may reach into
``slurmctl.flows`` (the cancellation and the workers' template); nothing below it does.
"""
