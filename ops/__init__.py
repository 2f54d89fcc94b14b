"""Operating tollgate: the ``tollgate`` command (``up``, ``demo``, the admin subcommands), the launcher
that runs the mesh as processes, the cost report and the reconciliation.

ops talks to the mesh over gRPC only (the generated stubs and ``libs``); it imports nothing from
``services`` or ``tests``.
"""
