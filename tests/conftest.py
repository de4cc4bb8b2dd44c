"""Shared pytest configuration: the local-stack fixtures (`stack`, `cluster_stack`) of stack.py."""

pytest_plugins = ["stack"]
