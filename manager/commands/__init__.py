"""The ``streamboss`` CLI by verb group: one module per group, which ``cli.py``
registers on its command group."""
