"""The books: one job's durable state in its manifest store, and the rules that keep it balanced.

Manifest models and keys (``manifests``), reading and writing the job manifest (``store``), admitting a job
(``admission``), verified parts (``parts``), failure state (``failures``), the completeness gate (``audit``), the
coordinator's heartbeat (``heartbeat``) and the job's rate limits (``limits``). Everything here works from manifests
alone, so ``slurmctl status`` needs neither Prefect nor a cluster. It sits over ``slurmctl.blocks`` and under
``slurmctl.tasks`` and ``slurmctl.flows``, which it never imports.
"""
