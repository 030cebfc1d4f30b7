"""The Pulumi program for streamboss on AWS, as a package of small modules.

Importing this package must not import Pulumi: ``infra.metrics`` and
``infra.operations`` are pure and are used by code that runs without it.
"""
