"""The local stack's library: `ops/devstack` and what the tests and the benchmark share with it.

Running the stack (`ops/devstack`, whose command line is :mod:`stacklib.cli`), stdlib only so that
`ops/devstack install` works on a fresh machine:

- :mod:`stacklib.common`: paths, the error type, progress lines, file locks;
- :mod:`stacklib.layout`: a stack's shape, services, ports, settings and state file;
- :mod:`stacklib.configs`: Kafka's and Redis' configuration files;
- :mod:`stacklib.install`: the first-time installs (apt, Maven, npm);
- :mod:`stacklib.processes`: the services' processes (pid files, start, stop, storage format);
- :mod:`stacklib.ports`: free ports and the machine-wide port-base claims;
- :mod:`stacklib.probes`: waiting until Redis and Kafka answer (needs confluent-kafka, redis-py).

Shared with tests/stack.py, tests/instances.py, tests/progress.py, bench/ and ops/demo:

- :mod:`stacklib.client`: a running stack's Kafka (AdminClient, topics, committed offsets,
  high watermarks) and Redis (clients, INFO), and running `ops/devstack` itself;
- :mod:`stacklib.children`: child processes in their own session with a log file.

Importable with ``ops/`` on ``sys.path``: `ops/devstack` and `ops/demo` put it there, pytest does
(``pythonpath`` in pyproject.toml), and so does the benchmark (bench/stack.py, bench/children.py).
"""
