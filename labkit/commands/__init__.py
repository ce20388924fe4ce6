"""The command line's commands, one module per area: ``tools`` (doctor,
bench), ``image``, ``vm`` (the persistent VM and ``run``), ``lab`` (the
matrix, JupyterLab), ``course`` (check, source, the instructor's tools).

Each module adds its subcommands to the parser and holds their ``cmd_*``
functions: they turn parsed arguments into calls of the layers below and
print the result. Policy (what to start, what a value may be) lives below;
``common`` holds what the commands share. ``labkit.cli`` is the face that
puts them together.
"""
